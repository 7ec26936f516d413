"""Text generation with a KV cache: greedy search, beam search and sampling for decoders and
encoder-decoders (``python -m podformer.generate``: the command, podformer/generate_cli.py).

One jitted function per shape: prefill (the prompt, or the encoder and the start token), then a
``jax.lax.while_loop`` whose body runs one cached decoding step. Beam search is transformers'
``generate(num_beams=N, length_penalty=..., early_stopping=False)`` step for step (GenerationMixin.
_beam_search, transformers 5): the top 2N continuations per item, finished hypotheses scored
``sum logprob / generated_length ** length_penalty``, and its stopping heuristic.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from podformer import sampling as sampling_lib
from podformer.core.errors import UserError
from podformer.model import families, gpt, t5

Array = jax.Array
PLAIN = sampling_lib.Sampling()  # sampling from the model's own distribution
NEG = -1.0e9  # transformers' "impossible" score; float32 arithmetic on it must match theirs


def generate(
    model: gpt.GPT | t5.T5,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    decoder_start_id: int | None = None,
) -> np.ndarray:
    """Generated ids (B, max_new_tokens) int32: no prompt, no start token; after the first eos, pad_id.

    Decoder-only: ``input_ids`` is the prompt, LEFT-padded (``attention_mask`` 0 = padding).
    Encoder-decoder: the encoder inputs (any padding); the decoder starts from ``decoder_start_id``
    (T5: the pad id; BART: the eos id). ``eos_id=None``: generate exactly max_new_tokens."""
    ids, mask, seq2seq = _check_inputs(model, input_ids, attention_mask, max_new_tokens, decoder_start_id)
    if num_beams < 1:
        raise UserError(f"generate: num_beams={num_beams} must be >= 1")
    graphdef, state = nnx.split(model)
    # length ** length_penalty in float64, then float32: transformers divides by a Python float.
    denom = np.asarray([1.0] + [float(n) ** length_penalty for n in range(1, max_new_tokens + 1)], np.float32)
    out = _generate(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        jnp.int32(0 if decoder_start_id is None else decoder_start_id),
        jnp.asarray(denom),
        seq2seq=seq2seq,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )
    out = np.asarray(out)
    if eos_id is not None:  # pad after the first eos (a no-op for what the loops produce; cheap insurance)
        after_eos = np.cumsum(out == eos_id, axis=1) - (out == eos_id) > 0
        out = np.where(after_eos, pad_id, out).astype(np.int32)
    return out


def _check_inputs(model, input_ids, attention_mask, max_new_tokens: int, decoder_start_id):
    """(ids, mask, seq2seq) after the checks generate() and sample() share."""
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise UserError(f"generate: input_ids {ids.shape} and attention_mask {mask.shape} must both be (batch, length)")
    if max_new_tokens < 1:
        raise UserError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
    if not mask.any(axis=1).all():
        raise UserError("generate: a row of attention_mask is all padding; every input needs at least one token")
    family = families.find(getattr(model, "cfg", None))
    kind = family.kind if family is not None else None
    seq2seq = kind == "seq2seq"
    if seq2seq:
        if decoder_start_id is None:
            raise UserError("generate: an encoder-decoder needs decoder_start_id (T5: the pad id; BART: the eos id)")
        longest = max_new_tokens  # decoder positions 0 .. max_new_tokens - 1 are fed
    elif kind == "decoder":
        if (np.diff(mask, axis=1) < 0).any():
            raise UserError("generate: decoder-only prompts must be left-padded (attention_mask 0s before 1s)")
        longest = int(mask.sum(axis=1).max()) + max_new_tokens - 1
    else:
        raise UserError(f"generate: {type(model).__name__} is not a generative model (a GPT or T5/BART)")
    if model.cfg.position == "learned" and longest > model.cfg.max_len:
        raise UserError(
            f"generate: prompt + max_new_tokens needs {longest} positions and the model has {model.cfg.max_len}; "
            "shorten the prompt or max_new_tokens"
        )
    return ids, mask, seq2seq


@functools.partial(jax.jit, static_argnames=("graphdef", "seq2seq", "max_new_tokens", "num_beams"))
def _generate(graphdef, state, ids, mask, eos_id, pad_id, start_id, denom, *, seq2seq, max_new_tokens, num_beams):
    B = ids.shape[0]
    T = max_new_tokens
    logits, cache, run_step = _prefill(graphdef, state, ids, mask, start_id, seq2seq, T, num_beams)
    if num_beams == 1:
        return _greedy_loop(run_step, logits, cache, T, eos_id, pad_id)
    return _beam_loop(run_step, logits, cache, B, num_beams, T, eos_id, pad_id, denom)


def _prefill(graphdef, state, ids, mask, start_id, seq2seq: bool, T: int, copies: int):
    """(float32 logits of the first new token (B * copies, V), the cache, the cached step) for T new
    tokens; each input repeated ``copies`` times, consecutively (beams, samples)."""
    model = nnx.merge(graphdef, state)
    B, S = ids.shape
    rows = B * copies
    if seq2seq:
        encoded = jnp.repeat(model.encode(ids, mask), copies, axis=0)
        enc_mask = jnp.repeat(mask, copies, axis=0)
        cache = model.init_cache(rows, T, S)  # the start token and T - 1 generated ones are fed
        start = jnp.full((rows, 1), start_id, jnp.int32)
        logits, cache = model.decode(start, encoded, enc_mask, cache=cache, last_only=True)
    else:
        ids, mask = jnp.repeat(ids, copies, axis=0), jnp.repeat(mask, copies, axis=0)
        enc_mask = None
        cache = model.init_cache(rows, S + T - 1)  # the last token is never fed back
        logits, cache = model(ids, mask, cache=cache, last_only=True)

    # The model is rebuilt inside the loop body from the (closed-over) state: NNX modules must not
    # cross into a transform's trace as Python objects.
    def run_step(tokens_B, cache):
        return _step(nnx.merge(graphdef, state), tokens_B, cache, enc_mask)

    return logits[:, 0].astype(jnp.float32), cache, run_step


def _step(model, tokens_B, cache, enc_mask):
    """One cached decoding step: float32 logits (B, V) of the token after ``tokens_B``, and the cache.
    ``enc_mask``: the encoder's padding mask (an encoder-decoder), None for a decoder."""
    if enc_mask is not None:
        logits, cache = model.decode(tokens_B[:, None], None, enc_mask, cache=cache, last_only=True)
    else:
        logits, cache = model(tokens_B[:, None], cache=cache, last_only=True)
    return logits[:, 0].astype(jnp.float32), cache


# Both loops pick token t from the logits at hand, then (while the loop goes on) feed it through one
# cached step: the prefill's logits give token 0 outside the loop, so no step is ever wasted.


def _greedy_loop(run_step, logits, cache, T, eos_id, pad_id):
    """transformers' greedy search: argmax; once a row has produced eos it emits pad."""
    B = logits.shape[0]

    def pick(c, logits):
        tok = jnp.where(c["done"], pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(c["out"], tok[:, None], (0, c["t"]))
        return dict(c, t=c["t"] + 1, out=out, done=c["done"] | (tok == eos_id), tokens=tok)

    def cond(c):
        return (c["t"] < T) & ~jnp.all(c["done"])

    def body(c):
        logits, cache = run_step(c["tokens"], c["cache"])
        return pick(dict(c, cache=cache), logits)

    init = dict(t=jnp.int32(0), out=jnp.full((B, T), pad_id, jnp.int32), done=jnp.zeros((B,), bool))
    init = pick(dict(init, cache=cache, tokens=jnp.zeros((B,), jnp.int32)), logits)
    return jax.lax.while_loop(cond, body, init)["out"]


def _gather(x, idx):
    """x (B, K, ...) -> (B, len(idx[b]), ...) picked per row, like transformers' _gather_beams."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_loop(run_step, logits, cache, B, N, T, eos_id, pad_id, denom):
    """transformers' _beam_search (early_stopping=False) with static shapes: N running beams, the N best
    finished hypotheses, and the per-item flag "a running beam may still beat the worst finished one"."""
    V = logits.shape[-1]
    K = 2 * N  # one eos token: keep 2N candidates so N of them can keep running
    top_n = jnp.arange(K) < N

    def pick(c, logits):
        t = c["t"]
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(B, N, V) + c["running_scores"][:, :, None]
        topk_lp, topk_idx = jax.lax.top_k(logp.reshape(B, N * V), K)
        src, tok = topk_idx // V, (topk_idx % V).astype(jnp.int32)
        topk_seq = _gather(c["running_seq"], src)
        topk_seq = jax.lax.dynamic_update_slice(topk_seq, tok[:, :, None], (0, 0, t))
        hits = (tok == eos_id) | (t + 1 >= T)

        # Running beams for the next step: the best N candidates that did not finish.
        running_lp = topk_lp + hits.astype(jnp.float32) * NEG
        _, keep = jax.lax.top_k(running_lp, N)
        running_seq = _gather(topk_seq, keep)
        running_scores = _gather(running_lp, keep)
        parent = _gather(src, keep)

        # Finished hypotheses: candidates among the top N that just finished compete with the kept ones.
        did = hits & top_n[None]
        scores = topk_lp / denom[t + 1]
        scores = scores + (~c["open"]).astype(jnp.float32)[:, None] * NEG
        scores = scores + (~did).astype(jnp.float32) * NEG
        merged_scores = jnp.concatenate([c["scores"], scores], axis=1)
        _, best = jax.lax.top_k(merged_scores, N)
        seqs = _gather(jnp.concatenate([c["seqs"], topk_seq], axis=1), best)
        fin_scores = _gather(merged_scores, best)
        finished = _gather(jnp.concatenate([c["finished"], did], axis=1), best)

        # Can a running beam still beat the worst finished hypothesis? (Scored at the current length.)
        best_running = running_scores[:, :1] / denom[t + 1]
        worst = jnp.where(finished, jnp.min(fin_scores, axis=1, keepdims=True), NEG)
        still_open = c["open"] & jnp.any(best_running > worst, axis=-1)
        return dict(
            c,
            t=t + 1,
            stop=~jnp.any(still_open) | jnp.all(hits),
            running_seq=running_seq,
            running_scores=running_scores,
            seqs=seqs,
            scores=fin_scores,
            finished=finished,
            open=still_open,
            tokens=_gather(tok, keep).reshape(-1),
            rows=(jnp.arange(B)[:, None] * N + parent).reshape(-1),
        )

    def cond(c):
        return ~c["stop"]

    def body(c):
        logits, cache = run_step(c["tokens"], c["cache"].reorder(c["rows"]))
        return pick(dict(c, cache=cache), logits)

    fill = jnp.full((B, N, T), pad_id, jnp.int32)
    init = dict(
        t=jnp.int32(0),
        cache=cache,
        running_seq=fill,
        # Only the first beam starts live, so the first step does not pick the same token N times.
        running_scores=jnp.zeros((B, N), jnp.float32).at[:, 1:].set(NEG),
        seqs=fill,
        scores=jnp.full((B, N), NEG, jnp.float32),
        finished=jnp.zeros((B, N), bool),
        open=jnp.ones((B,), bool),
    )
    return jax.lax.while_loop(cond, body, pick(init, logits))["seqs"][:, 0]


def greedy(graphdef, state, prompt_ids: list[int], max_new_tokens: int, max_len: int, eos_id: int | None = None):
    """Continue ``prompt_ids`` greedily (train.py's sample); ``state`` is a TrainState's state (the model
    is read from it). Returns the new tokens, up to and including eos."""
    prompt_ids = list(prompt_ids)[-(max_len - 1) :] or [0]
    n = min(max_new_tokens, max_len - len(prompt_ids))
    if n <= 0:
        return []
    model = nnx.merge(graphdef, state).model
    ids = np.asarray([prompt_ids], np.int32)
    out = generate(model, ids, np.ones_like(ids), max_new_tokens=n, eos_id=eos_id, pad_id=0)[0].tolist()
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    return out


# ---------------------------------------------------------------------------------------------------
# Sampling (podformer/sampling.py has the filters and the keys)


def sample(
    model: gpt.GPT | t5.T5,
    input_ids,
    attention_mask,
    *,
    key: Array,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    sampling: sampling_lib.Sampling = PLAIN,
    num_samples: int = 1,
    decoder_start_id: int | None = None,
) -> np.ndarray:
    """Sampled ids (B * num_samples, max_new_tokens) int32, as generate(): rows b * num_samples ..
    (b + 1) * num_samples - 1 continue input b (transformers' num_return_sequences order). Token t of
    output row r is drawn with ``fold_in(fold_in(key, r), t)``: the same key gives the same tokens, and a
    row's draws do not depend on the other rows. The repetition penalty sees the prompt's tokens (a
    decoder's; an encoder-decoder's decoder start token) and those generated so far."""
    ids, mask, seq2seq = _check_inputs(model, input_ids, attention_mask, max_new_tokens, decoder_start_id)
    if num_samples < 1:
        raise UserError(f"generate: num_samples={num_samples} must be >= 1")
    graphdef, state = nnx.split(model)
    out = _sample(
        graphdef,
        state,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.asarray(key),
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        jnp.int32(0 if decoder_start_id is None else decoder_start_id),
        seq2seq=seq2seq,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        sampling=sampling,
    )
    return np.asarray(out)


def first_seen(ids, mask, start_id, seq2seq: bool, vocab: int, copies: int) -> Array:
    """(B * copies, V) bool: the tokens the repetition penalty starts from (a decoder's prompt without
    its padding; an encoder-decoder's decoder start token)."""
    if seq2seq:
        seen = jnp.zeros((ids.shape[0], vocab), bool).at[:, start_id].set(True)
    else:
        rows = jnp.arange(ids.shape[0])[:, None]
        seen = jnp.zeros((ids.shape[0], vocab), jnp.int32).at[rows, ids].add(mask) > 0
    return jnp.repeat(seen, copies, axis=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "seq2seq", "max_new_tokens", "num_samples", "sampling"))
def _sample(
    graphdef, state, ids, mask, key, eos_id, pad_id, start_id, *, seq2seq, max_new_tokens, num_samples, sampling
):
    T = max_new_tokens
    logits, cache, run_step = _prefill(graphdef, state, ids, mask, start_id, seq2seq, T, num_samples)
    rows, V = logits.shape
    seen = first_seen(ids, mask, start_id, seq2seq, V, num_samples)
    keys = sampling_lib.row_keys(key, rows)

    def pick(c, logits):
        drawn = sampling_lib.draw(keys, c["t"], sampling_lib.filter_logits(logits, c["seen"], sampling))
        tok = jnp.where(c["done"], pad_id, drawn)
        out = jax.lax.dynamic_update_slice(c["out"], tok[:, None], (0, c["t"]))
        seen = c["seen"].at[jnp.arange(rows), tok].set(True)
        return dict(c, t=c["t"] + 1, out=out, done=c["done"] | (tok == eos_id), tokens=tok, seen=seen)

    def cond(c):
        return (c["t"] < T) & ~jnp.all(c["done"])

    def body(c):
        logits, cache = run_step(c["tokens"], c["cache"])
        return pick(dict(c, cache=cache), logits)

    init = dict(t=jnp.int32(0), out=jnp.full((rows, T), pad_id, jnp.int32), done=jnp.zeros((rows,), bool))
    init = pick(dict(init, cache=cache, tokens=jnp.zeros((rows,), jnp.int32), seen=seen), logits)
    return jax.lax.while_loop(cond, body, init)["out"]


def stream(
    model: gpt.GPT | t5.T5,
    input_ids,
    attention_mask,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    sampling: sampling_lib.Sampling | None = None,
    key: Array | None = None,
    decoder_start_id: int | None = None,
) -> Iterator[int]:
    """The tokens of one input as they are produced: greedy (``sampling=None``; generate()'s tokens) or
    sampled (sample()'s tokens with ``num_samples=1``), a host loop over the compiled cached step. Stops
    after eos."""
    ids, mask, seq2seq = _check_inputs(model, input_ids, attention_mask, max_new_tokens, decoder_start_id)
    if ids.shape[0] != 1:
        raise UserError(f"generate: stream() takes one input, not {ids.shape[0]}")
    if sampling is not None and key is None:
        raise UserError("generate: sampling needs a PRNG key")
    graphdef, state = nnx.split(model)
    start = jnp.int32(0 if decoder_start_id is None else decoder_start_id)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    logits, cache = _stream_prefill(graphdef, state, ids, mask, start, seq2seq=seq2seq, max_new_tokens=max_new_tokens)
    seen = first_seen(ids, mask, start, seq2seq, logits.shape[-1], 1)
    keys = sampling_lib.row_keys(jnp.asarray(key if key is not None else jax.random.key(0)), 1)
    for t in range(max_new_tokens):
        tok, seen = _stream_pick(logits, seen, keys, jnp.int32(t), sampling=sampling)
        yield int(tok[0])
        if int(tok[0]) == eos_id or t + 1 == max_new_tokens:
            return
        logits, cache = _stream_step(graphdef, state, tok, cache, mask if seq2seq else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "seq2seq", "max_new_tokens"))
def _stream_prefill(graphdef, state, ids, mask, start_id, *, seq2seq, max_new_tokens):
    logits, cache, _ = _prefill(graphdef, state, ids, mask, start_id, seq2seq, max_new_tokens, 1)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("sampling",))
def _stream_pick(logits, seen, keys, t, *, sampling):
    if sampling is None:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        tok = sampling_lib.draw(keys, t, sampling_lib.filter_logits(logits, seen, sampling))
    return tok, seen.at[jnp.arange(tok.shape[0]), tok].set(True)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _stream_step(graphdef, state, tokens_B, cache, enc_mask):
    return _step(nnx.merge(graphdef, state), tokens_B, cache, enc_mask)


if __name__ == "__main__":  # python -m podformer.generate; the command line lives beside this module, which
    # imports this one: run it by name, so the two do not import each other
    import runpy

    runpy.run_module("podformer.generate_cli", run_name="__main__", alter_sys=True)
