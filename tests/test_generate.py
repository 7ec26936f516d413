"""Decoding with a KV cache: cached logits equal the full forward pass; greedy and beam search equal
transformers' generate() token for token; eos handling and input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podformer import generate
from podformer.core.errors import UserError
from podformer.model import gpt, hf, params, t5
from tests import zoo_helpers as zh

V = 97


def build(module_cls, cfg, seed=0):
    """The module with random numpy parameters: no compile of JAX's random initialisers."""
    model = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
    rs = np.random.RandomState(seed)
    flat = {
        name: (1.0 if name.endswith("scale") else 0.0) + 0.2 * rs.standard_normal(shape).astype(np.float32)
        for name, shape in params.param_shapes(model).items()
    }
    params.set_params(model, flat)
    return model


TINY = dict(vocab_size=V, d_model=32, num_layers=2, num_heads=4, max_len=32)
DECODERS = {
    "gpt2": gpt.GPTConfig.tiny,
    # Rotary on half of each head, pairs interleaved, parallel block, untied head with a bias.
    "gptj": lambda **kw: gpt.GPTConfig.gptj_6b(rotary_dim=4, **kw),
    "bloom": gpt.GPTConfig.bloom_560m,  # ALiBi
    # A window shorter than the prompt, so the local layer really masks.
    "gpt_neo": lambda **kw: gpt.GPTConfig.gpt_neo_125m(attention_layers=("global", "local"), window_size=4, **kw),
}


def _steps(call, cache, tokens_BL):
    """Feed ``tokens_BL`` one position per cached call (a scan: one compiled step); logits (B, L, V)."""

    def step(cache, tok_B):
        logits, cache = call(tok_B[:, None], cache)
        return cache, logits[:, 0]

    _, logits_LBV = jax.lax.scan(step, cache, tokens_BL.T)
    return jnp.swapaxes(logits_LBV, 0, 1)


@pytest.mark.parametrize("name", list(DECODERS))
def test_cached_decoder_logits_equal_full_forward(name):
    """A left-padded prompt prefilled in one call, then one token per call: the logits of every real
    position equal one uncached forward pass over the whole sequence with the same positions."""
    model = build(gpt.GPT, DECODERS[name](scan_layers=name in ("gpt2", "bloom"), **TINY))
    B, L, P = 3, 12, 7
    ids = np.random.RandomState(0).randint(0, V, (B, L)).astype(np.int32)
    mask = np.ones((B, L), np.int32)
    mask[1, :2] = mask[2, :5] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)

    @nnx.jit
    def full_and_cached(m):
        full = m(ids, mask, positions=positions)
        first, cache = m(ids[:, :P], mask[:, :P], cache=m.init_cache(B, L))
        rest = _steps(lambda tok, cache: m(tok, cache=cache), cache, ids[:, P:])
        return full, jnp.concatenate([first, rest], axis=1)

    full, cached = full_and_cached(model)
    assert np.abs(np.asarray(cached) - np.asarray(full))[mask.astype(bool)].max() < 1e-5


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_cached_encoder_decoder_logits_equal_full_forward(name):
    """Cross-attention keys/values computed once at the first decoder call, then read from the cache."""
    cfg = (t5.T5Config.tiny if name == "t5" else t5.BartConfig.tiny)(
        vocab_size=V, d_model=32, num_layers=2, num_decoder_layers=3, num_heads=4, d_ff=64, head_dim=8
    )
    model = build(t5.T5, cfg)  # scanned layers (the unrolled cached path: test_generate_equals_transformers[t5])
    rs = np.random.RandomState(1)
    enc, dec = rs.randint(0, V, (3, 9)).astype(np.int32), rs.randint(0, V, (3, 6)).astype(np.int32)
    enc_mask = np.ones_like(enc)
    enc_mask[1, 6:] = 0

    @nnx.jit
    def full_and_cached(m):
        encoded = m.encode(enc, enc_mask)  # the encoder runs once either way; the decoder is compared
        full = m.decode(dec, encoded, enc_mask)
        first, cache = m.decode(dec[:, :2], encoded, enc_mask, cache=m.init_cache(3, 6, 9))
        rest = _steps(lambda tok, cache: m.decode(tok, None, enc_mask, cache=cache), cache, dec[:, 2:])
        return full, jnp.concatenate([first, rest], axis=1)

    full, cached = full_and_cached(model)
    assert np.abs(np.asarray(cached) - np.asarray(full)).max() < 1e-5


# Tiny random models copy their input or repeat one token forever; these changes make the continuation
# depend on the prompt and the position, so eos, beams and padding all matter in the comparison.
LIVELY = {
    "gpt2": lambda name, p: p.mul_(16.0) if name == "transformer.wpe.weight" else None,
    "t5": lambda name, p: p.mul_(3.0) if p.ndim == 2 else None,
    "bart": lambda name, p: p.mul_(8.0) if "encoder_attn" in name or "decoder.embed_positions" in name else None,
}
# (eos, pad, decoder start): an eos the reference emits mid-way in some rows and never in others.
TOKENS = {"gpt2": (54, 0, None), "t5": (91, 0, 0), "bart": (31, 1, 2)}
T = 10  # new tokens


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cache = {}

    def get(name):
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name))
            ref = zh.make_reference(name, path)
            with torch.no_grad():
                for pname, p in ref.named_parameters():
                    LIVELY[name](pname, p)
                if name == "bart":
                    ref.final_logits_bias.mul_(0.1)
            ref.save_pretrained(path)
            cache[name] = ref, path
        return cache[name]

    return get


def _inputs(name):
    b = zh.batch(name)
    ids, mask = b["input_ids"], b["attention_mask"]
    if name == "gpt2":  # decoder prompts are left-padded
        mask = np.ones_like(ids)
        mask[1, :4] = mask[2, :2] = 0
    return ids, mask


@pytest.fixture(scope="module")
def reference_output(reference):
    """(name, num_beams, length_penalty) -> transformers' generated ids, shaped like generate()'s output."""
    import torch

    @functools.cache
    def run(name, num_beams, length_penalty):
        ref, ids, mask = reference(name)[0], *_inputs(name)
        eos, pad, start = TOKENS[name]
        kw = dict(max_new_tokens=T, num_beams=num_beams, length_penalty=length_penalty, early_stopping=False)
        # use_cache=False: the reference recomputes every step in full (its T5 cache also assumes as many
        # decoder layers as encoder layers). BART's config forces eos at the last step; generate() has no
        # such option.
        kw.update(do_sample=False, eos_token_id=eos, pad_token_id=pad, use_cache=False, forced_eos_token_id=None)
        if start is not None:
            kw["decoder_start_token_id"] = start
        with torch.no_grad():
            out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).numpy()
        out = out[:, ids.shape[1] :] if start is None else out[:, 1:]  # drop the prompt / the start token
        out = np.pad(out, ((0, 0), (0, T - out.shape[1])), constant_values=pad)  # stops when all rows are done
        # Its beam search fills finished rows with eos when pad_token_id is 0 (`pad_token_id or eos` in
        # _beam_search); generate() pads after the first eos whatever the pad id.
        return np.where(np.cumsum(out == eos, axis=1) - (out == eos) > 0, pad, out)

    return run


@pytest.mark.parametrize(
    "name,num_beams,length_penalty",
    [("gpt2", 1, 1.0), ("gpt2", 3, 0.5), ("t5", 1, 1.0), ("t5", 3, 2.0), ("bart", 1, 1.0), ("bart", 3, 0.5)],
)
def test_generate_equals_transformers(name, num_beams, length_penalty, reference, reference_output):
    _, path = reference(name)
    ids, mask = _inputs(name)
    eos, pad, start = TOKENS[name]
    expected = reference_output(name, num_beams, length_penalty)
    # Layer stacks: scanned, and unrolled for one encoder-decoder (the decoder-only unrolled cache is
    # covered by test_cached_decoder_logits_equal_full_forward).
    model = hf.from_pretrained(path, scan_layers=not (name == "t5" and num_beams == 1))
    got = generate.generate(
        model,
        ids,
        mask,
        max_new_tokens=T,
        eos_id=eos,
        pad_id=pad,
        num_beams=num_beams,
        length_penalty=length_penalty,
        decoder_start_id=start,
    )
    assert got.dtype == np.int32 and got.shape == (ids.shape[0], T)
    np.testing.assert_array_equal(got, expected)
    finished = (got == eos).any(axis=1)
    first_eos = np.argmax(got == eos, axis=1)
    for row in np.flatnonzero(finished):
        assert (got[row, first_eos[row] + 1 :] == pad).all()
    # The comparison exercised what it should: greedy rows that end early and rows that run to the end,
    # beams that find something else than greedy search.
    if num_beams == 1:
        assert finished.any() and not finished.all(), got
    else:
        greedy = reference_output(name, 1, 1.0)
        assert not np.array_equal(expected, greedy), "beam search found the greedy answer: a weak test"


def test_input_errors():
    model = nnx.eval_shape(lambda: gpt.GPT(gpt.GPTConfig.tiny(**TINY), rngs=nnx.Rngs(0)))
    ids, mask = np.ones((2, 5), np.int32), np.ones((2, 5), np.int32)
    right_padded = mask.copy()
    right_padded[0, 3:] = 0
    kw = dict(max_new_tokens=4, eos_id=1, pad_id=0)
    with pytest.raises(UserError, match="must be left-padded"):
        generate.generate(model, ids, right_padded, **kw)
    with pytest.raises(UserError, match="needs 33 positions and the model has 32"):
        generate.generate(model, np.ones((2, 30), np.int32), np.ones((2, 30), np.int32), **kw)
    with pytest.raises(UserError, match="all padding"):
        generate.generate(model, ids, np.zeros_like(mask), **kw)
    t5_model = nnx.eval_shape(lambda: t5.T5(t5.T5Config.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(UserError, match="needs decoder_start_id"):
        generate.generate(t5_model, ids, mask, **kw)
