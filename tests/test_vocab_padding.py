"""Vocabularies padded to a multiple of 128: the padding takes no probability and no gradient, and never
leaves the model (user-facing logits, Hugging Face export, canonical parameters)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from podformer import objective_losses as ol
from podformer import optim, trainer
from podformer.configs import common
from podformer.losses import LOSSES, token_cross_entropy
from podformer.model import bert, gpt, hf, params, t5, vocab

V = 100  # padded to 128
SMALL = dict(vocab_size=V, d_model=32, num_layers=1, num_heads=2, dropout=0.0, attention_dropout=0.0)
B, L = 2, 8


def _poison(model):
    """Large values in every padded entry: a padding that reached a softmax would dominate it."""
    state = nnx.state(model, params.SAVED)
    find = params._vocab_axis(model)
    for path, var in nnx.to_flat_state(state):
        where = find(path, var)
        if where is not None:
            axis, size = where
            index = (slice(None),) * axis + (slice(size, None),)
            var.set_value(var.get_value().at[index].set(1e3))
    nnx.update(model, state)
    return model


def _twins(cls, cfg):
    """A padded model with its padding poisoned, and the same function without padding."""
    padded = cls(cfg, rngs=nnx.Rngs(0))
    plain = cls(dataclasses.replace(cfg, vocab_multiple=1), rngs=nnx.Rngs(1))
    params.set_params(plain, params.get_params(padded))
    return _poison(padded), plain


def _decoder_batch(rng):
    return {
        "inputs": rng.integers(0, V, (B, L)).astype(np.int32),
        "targets": np.concatenate([np.full((B, 1), V - 1), rng.integers(0, V, (B, L - 1))], 1).astype(np.int32),
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
        "loss_weights": np.ones((B, L), np.float32),
    }


def _seq2seq_batch(rng):
    d = _decoder_batch(rng)
    return {
        "encoder_inputs": rng.integers(0, V, (B, L)).astype(np.int32),
        "encoder_segment_ids": d["segment_ids"],
        "encoder_positions": d["positions"],
        "decoder_inputs": d["inputs"],
        "decoder_targets": d["targets"],
        "decoder_segment_ids": d["segment_ids"],
        "decoder_positions": d["positions"],
        "decoder_loss_weights": d["loss_weights"],
    }


CASES = {
    # The fused LM-head loss, tied; untied with GPT-J's output bias.
    "gpt_tied": (gpt.GPT, gpt.GPTConfig.tiny(**SMALL, max_len=L), "causal_lm", _decoder_batch),
    "gpt_untied_bias": (
        gpt.GPT,
        gpt.GPTConfig.tiny(**SMALL, max_len=L, tie_embeddings=False, lm_head_bias=True),
        "causal_lm",
        _decoder_batch,
    ),
    # token_cross_entropy on the MLM head (tied, with its bias); BART's logits bias; T5 v1.1's untied head.
    "bert_mlm": (bert.Bert, bert.BertConfig.tiny(**SMALL, max_len=L, d_ff=64), "mlm", _decoder_batch),
    "bart": (t5.T5, t5.BartConfig.tiny(**SMALL, max_len=L, d_ff=64), "bart", _seq2seq_batch),
    "t5_untied": (t5.T5, t5.T5Config.tiny(**SMALL, d_ff=64, tie_embeddings=False), "span_corruption", _seq2seq_batch),
}


def _loss_and_grads(model, name, batch):
    loss = LOSSES[name]
    denom = loss.denominators(batch)
    f = nnx.jit(nnx.value_and_grad(lambda m: loss.fn(m, batch, None, denom), has_aux=True))
    (value, metrics), grads = f(model)
    return float(value), {k: float(v) for k, v in metrics.items()}, dict(nnx.to_flat_state(grads))


@pytest.mark.parametrize("case", CASES)
def test_padded_loss_equals_the_unpadded_one_and_the_padding_gets_no_gradient(case):
    module_cls, cfg, objective, make_batch = CASES[case]
    assert cfg.padded_vocab_size == 128
    padded, plain = _twins(module_cls, cfg)
    batch = make_batch(np.random.default_rng(0))
    loss, metrics, grads = _loss_and_grads(padded, objective, batch)
    ref_loss, ref_metrics, ref_grads = _loss_and_grads(plain, objective, batch)
    assert abs(loss - ref_loss) < 1e-6 and abs(metrics["accuracy"] - ref_metrics["accuracy"]) < 1e-6
    padded_entries = 0
    for path, g in grads.items():
        g, ref = np.asarray(g.get_value()), np.asarray(ref_grads[path].get_value())
        if g.shape != ref.shape:  # a token table: its real part matches, its padding has no gradient
            axis = next(i for i, (a, b) in enumerate(zip(g.shape, ref.shape, strict=True)) if a != b)
            assert np.all(np.take(g, np.arange(V, g.shape[axis]), axis) == 0), path
            g = np.take(g, np.arange(V), axis)
            padded_entries += 1
        np.testing.assert_allclose(g, ref, atol=1e-6, err_msg=str(path))
    assert padded_entries >= 1


def test_logits_have_the_tokenizers_vocabulary_and_the_padded_view_is_masked():
    module_cls, cfg, _, _ = CASES["gpt_untied_bias"]
    padded, plain = _twins(module_cls, cfg)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, L)), jnp.int32)
    got, full = (np.asarray(x) for x in nnx.jit(lambda m: (m(ids), m(ids, padded_vocab=True)))(padded))
    ref = np.asarray(nnx.jit(lambda m: m(ids))(plain))
    assert got.shape == ref.shape == (B, L, V)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert full.shape == (B, L, 128) and np.all(full[..., V:] == vocab.PAD_LOGIT)
    assert np.all(np.asarray(jax.nn.softmax(full, axis=-1))[..., V:] == 0)  # no probability mass


def test_soft_targets_and_accuracy_ignore_the_padding():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 5, V)).astype(np.float32), rng.normal(size=(2, 5, V)).astype(np.float32)
    pad = np.full((2, 5, 28), vocab.PAD_LOGIT, np.float32)
    s_pad, t_pad = np.concatenate([s, pad], -1), np.concatenate([t, pad], -1)
    real = np.ones((2, 5), np.float32)
    for temperature in (1.0, 2.0):
        got = ol.soft_cross_entropy(jnp.asarray(s_pad), jnp.asarray(t_pad), real, temperature)
        assert np.isfinite(float(got))
        assert abs(float(got) - float(ol.soft_cross_entropy(s, t, real, temperature))) < 1e-5
    g = jax.grad(lambda x: ol.soft_cross_entropy(x, jnp.asarray(t_pad), real, 2.0))(jnp.asarray(s_pad))
    assert np.all(np.asarray(g)[..., V:] == 0)
    targets = rng.integers(0, V, (2, 5)).astype(np.int32)
    ce, correct = token_cross_entropy(jnp.asarray(s_pad), targets, real)
    ref_ce, ref_correct = token_cross_entropy(jnp.asarray(s), targets, real)
    assert abs(float(ce) - float(ref_ce)) < 1e-5 and float(correct) == float(ref_correct)


def test_an_optimizer_step_leaves_the_padding_zero():
    """Zero rows with zero gradients stay zero under AdamW (decoupled decay of zero is zero) and clipping."""
    module_cls, cfg, _, _ = CASES["gpt_untied_bias"]
    model = module_cls(cfg, rngs=nnx.Rngs(0))
    opt_cfg = common.base("t", cfg).opt
    opt_cfg.warmup_steps = 0
    optimizer = nnx.Optimizer(model, optim.make_optimizer(opt_cfg, 10), wrt=nnx.Param)
    batch = _decoder_batch(np.random.default_rng(3))
    denom = LOSSES["causal_lm"].denominators(batch)
    before = np.asarray(model.lm_head[...])

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: LOSSES["causal_lm"].fn(m, batch, None, denom)[0])(model)
        optimizer.update(model, grads)

    step(model, optimizer)
    for table in (model.embed[...], model.lm_head[...].T, model.lm_head_bias.bias[...][:, None]):
        assert np.all(np.asarray(table)[V:] == 0)
    assert not np.array_equal(np.asarray(model.lm_head[...])[:, :V], before[:, :V])  # the step did train


def test_greedy_and_beam_generation_never_emit_the_padding():
    from podformer.generate import generate

    module_cls, cfg, _, _ = CASES["gpt_tied"]
    padded, plain = _twins(module_cls, dataclasses.replace(cfg, max_len=16))
    prompt = np.random.default_rng(4).integers(0, V, (2, 3)).astype(np.int32)
    for beams in (1, 2):
        kw = dict(max_new_tokens=6, eos_id=None, pad_id=0, num_beams=beams)
        got = generate(padded, prompt, np.ones_like(prompt), **kw)
        assert got.max() < V
        assert np.array_equal(got, generate(plain, prompt, np.ones_like(prompt), **kw))


def test_export_strips_the_padding_and_import_pads_it(tmp_path):
    """The exported tables have the tokenizer's rows; exported again after import, bit for bit the same."""
    cfg = gpt.GPTConfig.gptj_6b(vocab_size=97, max_len=16, d_model=32, num_layers=1, num_heads=4, rotary_dim=4)
    padded, _ = _twins(gpt.GPT, cfg)  # GPT-J: an untied output projection with a bias
    hf.save_pretrained(padded, str(tmp_path / "a"))
    first = hf.read_safetensors(str(tmp_path / "a" / "model.safetensors"))
    assert first["transformer.wte.weight"].shape[0] == 97 and first["lm_head.bias"].shape == (97,)
    again = hf.from_pretrained(str(tmp_path / "a"))
    assert again.embed[...].shape[0] == 128 and np.all(np.asarray(again.embed[...])[97:] == 0)
    hf.save_pretrained(again, str(tmp_path / "b"))
    second = hf.read_safetensors(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(first) == sorted(second) and all(np.array_equal(first[k], second[k]) for k in first)


def test_counts_and_checkpoints_written_before_padding():
    cfg = gpt.GPTConfig.gpt2_small()
    graphdef, abstract = trainer.abstract_state(lambda r: gpt.GPT(cfg, rngs=r), optax.adamw(1e-3), 0)
    assert cfg.padded_vocab_size == 50304
    # GPT-2's published 124,439,808, and 47 padding rows of 768 more held.
    assert trainer.param_summary(graphdef, abstract, cfg) == (
        "124,439,808 parameters (124,475,904 held: the vocabulary of 50,257 padded to 50,304)"
    )
    # A checkpoint's model section without vocab_multiple was written with unpadded tables.
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "vocab_multiple"}
    _, old = params.config_from_dict({"family": "gpt", **d})
    assert old.vocab_multiple == 1 and old.padded_vocab_size == 50257
