"""Properties of the zoo's modules that parity on one batch cannot show: causality, padding invariance,
local windows, packed segments (self- and cross-attention), and the forward signatures.

Each test puts its variants in the rows of one batch, so one compiled forward answers it."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podformer.model import bert, gpt, params, t5

V = 50
# Compiled once per model and shape; eager calls would compile every operation (or the scan) per call.
forward = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))


def build(module_cls, cfg, seed=0):
    """The module with random numpy parameters: no per-shape compiles of JAX's random initialisers."""
    model = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
    rs = np.random.RandomState(seed)
    flat = {
        name: (1.0 if name.endswith("scale") else 0.0) + 0.3 * rs.standard_normal(shape).astype(np.float32)
        for name, shape in params.param_shapes(model).items()
    }
    params.set_params(model, flat)
    return model


def ids(*shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(3, V, shape))


def packed_rows(a, b):
    """Row 0: documents a and b packed; row 1: a alone; row 2: b alone (both right-padded)."""
    la, lb = a.shape[1], b.shape[1]
    pad = lambda x, n: jnp.concatenate([x, jnp.zeros((1, n), x.dtype)], 1)  # noqa: E731
    tokens = jnp.concatenate([jnp.concatenate([a, b], 1), pad(a, lb), pad(b, la)])
    segments = jnp.asarray([[1] * la + [2] * lb, [1] * la + [0] * lb, [1] * lb + [0] * la])
    positions = jnp.asarray([list(range(la)) + list(range(lb)), list(range(la + lb)), list(range(la + lb))])
    return tokens, segments, positions


@pytest.fixture(scope="module")
def t5_model():
    return build(t5.T5, t5.T5Config.tiny(vocab_size=V, d_model=32, num_layers=2, num_heads=4, head_dim=8))


@pytest.fixture(scope="module")
def bart_model():
    return build(t5.T5, t5.BartConfig.tiny(vocab_size=V, d_model=32, num_layers=2, num_heads=4), seed=1)


@pytest.mark.parametrize("which", ["t5_model", "bart_model"])
def test_encoder_decoder_is_causal_in_the_decoder_only(which, request):
    model = request.getfixturevalue(which)
    src, tgt = ids(1, 9), ids(1, 8, seed=1)
    changes = (0, 4, 7)
    tgts = jnp.concatenate([tgt] + [tgt.at[0, s].set((tgt[0, s] + 1) % V) for s in changes] + [tgt])
    srcs = jnp.concatenate([src] * (len(changes) + 1) + [src.at[0, 8].set(1)])
    out = forward(model, srcs, tgts)
    for row, s in enumerate(changes, 1):
        assert jnp.array_equal(out[row, :s], out[0, :s]), s  # earlier decoder positions: untouched
        assert not jnp.allclose(out[row, s:], out[0, s:])
    assert not jnp.allclose(out[-1, 0], out[0, 0])  # every decoder position sees the whole source


@pytest.mark.parametrize("which", ["t5_model", "bart_model"])
def test_packed_encoder_decoder_segments_are_independent(which, request):
    model = request.getfixturevalue(which)
    src, src_seg, src_pos = packed_rows(ids(1, 5), ids(1, 6, seed=2))
    tgt, tgt_seg, tgt_pos = packed_rows(ids(1, 4, seed=1), ids(1, 5, seed=3))
    out = forward(
        model,
        src,
        tgt,
        encoder_segment_ids=src_seg,
        encoder_positions=src_pos,
        decoder_segment_ids=tgt_seg,
        decoder_positions=tgt_pos,
    )
    np.testing.assert_allclose(out[0, :4], out[1, :4], atol=1e-5)
    np.testing.assert_allclose(out[0, 4:], out[2, :5], atol=1e-5)


def test_bert_outputs_do_not_depend_on_padding():
    """The same 7 tokens followed by different padding (content and token types): with the mask their
    outputs are identical; without it they differ (so the test can fail)."""
    model = build(bert.Bert, bert.BertConfig.tiny(vocab_size=V, d_model=32, num_heads=4, d_ff=64))
    x, types = ids(1, 7), jnp.asarray([[0, 0, 0, 1, 1, 1, 1]])
    tokens = jnp.concatenate([jnp.concatenate([x, ids(1, 5, seed=s)], 1) for s in (1, 2)])
    tt = jnp.concatenate([jnp.concatenate([types, jnp.full((1, 5), s, jnp.int32)], 1) for s in (0, 1)])
    mask = jnp.asarray([[1] * 7 + [0] * 5] * 2)
    out = forward(model, tokens, mask, tt)
    np.testing.assert_allclose(out[0, :7], out[1, :7], atol=1e-5)
    unmasked = forward(model, tokens, jnp.ones_like(mask), tt)  # without the mask the padding shows
    assert not np.allclose(unmasked[0, :7], unmasked[1, :7], atol=1e-3)


def test_local_attention_window():
    """One local layer with a window of 3: position t sees t-2..t and nothing before."""
    cfg = gpt.GPTConfig.tiny(vocab_size=V, d_model=32, num_layers=1, num_heads=4, attention_layers=("local",))
    x, t = ids(1, 10), 8
    rows = jnp.concatenate([x, x.at[0, t - 3].set(1), x.at[0, t - 2].set(1)])
    out = forward(build(gpt.GPT, dataclasses.replace(cfg, window_size=3)), rows)
    assert jnp.array_equal(out[1, t], out[0, t])
    assert not jnp.allclose(out[2, t], out[0, t])


@pytest.mark.parametrize("position", ["alibi", "rotary"])
def test_packed_decoder_segments_with_relative_positions(position):
    """ALiBi and rotary models see each packed document as if it were alone (positions restart)."""
    cfg = gpt.GPTConfig.tiny(vocab_size=V, d_model=32, num_layers=2, num_heads=4, position=position)
    model = build(gpt.GPT, dataclasses.replace(cfg, embed_norm=True))
    tokens, segments, positions = packed_rows(ids(1, 6), ids(1, 5, seed=1))
    out = forward(model, tokens, segment_ids=segments, positions=positions)
    np.testing.assert_allclose(out[0, :6], out[1, :6], atol=1e-5)
    np.testing.assert_allclose(out[0, 6:], out[2, :5], atol=1e-5)


def test_decoders_refuse_token_types():
    model = build(gpt.GPT, gpt.GPTConfig.tiny(vocab_size=V, d_model=32, num_layers=1, num_heads=4))
    with pytest.raises(ValueError, match="no token types"):
        model(ids(1, 4), token_type_ids=jnp.zeros((1, 4), jnp.int32))


def test_output_biases_are_not_weight_decayed():
    """BERT's MLM bias and GPT-J's output bias are biases to the optimizer (named `bias`), like BERT's own
    recipe, which exempts every bias and LayerNorm from weight decay."""
    from podformer import optim

    for model in (
        nnx.eval_shape(lambda: bert.Bert(bert.BertConfig.tiny(), rngs=nnx.Rngs(0))),
        nnx.eval_shape(lambda: gpt.GPT(gpt.GPTConfig.tiny(tie_embeddings=False, lm_head_bias=True), rngs=nnx.Rngs(0))),
    ):
        mask = dict(nnx.to_flat_state(optim.decay_mask(nnx.state(model, nnx.Param))))
        decayed = {".".join(map(str, k)) for k, v in mask.items() if (v.get_value() if hasattr(v, "get_value") else v)}
        assert not any("bias" in name or "norm" in name for name in decayed), decayed
        assert "embed" in decayed
