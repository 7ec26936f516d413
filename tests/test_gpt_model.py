"""GPT-2: parity with transformers, preset parameter counts, causality, packed segments, layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podformer.model import gpt, hf, params


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=97, n_positions=40, n_embd=48, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(config).eval()
    # Non-trivial LayerNorm and bias values, so a swapped or dropped parameter cannot go unnoticed.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_gpt2")
    ref.save_pretrained(path)
    return ref, str(path)


@pytest.mark.parametrize("scan", [True, False])
def test_logits_match_transformers(hf_gpt2, scan):
    torch = pytest.importorskip("torch")
    ref, path = hf_gpt2
    ours = hf.from_pretrained(path, scan_layers=scan)
    ids = np.random.RandomState(0).randint(0, 97, (3, 17))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    for m in (None, mask):
        with torch.no_grad():
            expected = ref(torch.tensor(ids), attention_mask=None if m is None else torch.tensor(m)).logits.numpy()
        got = np.asarray(ours(jnp.asarray(ids), attention_mask=None if m is None else jnp.asarray(m)))
        keep = np.ones(ids.shape, bool) if m is None else m.astype(bool)
        assert np.abs(got - expected)[keep].max() < 1e-4


@pytest.mark.parametrize(
    "preset,count",
    [
        ("gpt2_small", 124_439_808),
        ("gpt2_medium", 354_823_168),
        ("gpt2_large", 774_030_080),
        ("gpt2_xl", 1_557_611_200),
    ],
)
def test_preset_parameter_counts(preset, count):
    abstract = nnx.eval_shape(lambda: gpt.GPT(getattr(gpt.GPTConfig, preset)(), rngs=nnx.Rngs(0)))
    assert params.count(abstract) == count  # over the tokenizer's vocabulary, without the padding rows


def _tiny(**kw):
    return gpt.GPT(gpt.GPTConfig.tiny(vocab_size=64, d_model=32, num_layers=2, num_heads=4, **kw), rngs=nnx.Rngs(0))


def test_causal_gradients_are_exactly_zero():
    model = _tiny()
    L = 12
    emb = jax.random.normal(jax.random.key(1), (1, L, 32))
    ids = jnp.zeros((1, L), jnp.int32)

    def logits_at(e, t):
        return model(ids, inputs_embeds=e)[0, t].sum()

    for t in (0, 5, L - 2):
        g = jax.grad(logits_at)(emb, t)
        assert jnp.all(g[0, t + 1 :] == 0.0), t
        assert jnp.any(g[0, : t + 1] != 0.0)


def test_packed_segments_do_not_attend_to_each_other():
    model = _tiny()
    a, b = np.arange(3, 10), np.arange(20, 25)
    ids = jnp.asarray(np.concatenate([a, b])[None])
    seg = jnp.asarray(np.array([[1] * len(a) + [2] * len(b)]))
    pos = jnp.asarray(np.concatenate([np.arange(len(a)), np.arange(len(b))])[None])
    packed = model(ids, segment_ids=seg, positions=pos)
    alone_a = model(jnp.asarray(a[None]))
    alone_b = model(jnp.asarray(b[None]))
    np.testing.assert_allclose(packed[0, : len(a)], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, len(a) :], alone_b[0], atol=1e-5)
    # And by gradients: segment 2's outputs do not depend on segment 1's inputs at all.
    emb = jnp.take(model.embed[...], ids, axis=0)
    g = jax.grad(lambda e: model(ids, segment_ids=seg, positions=pos, inputs_embeds=e)[0, len(a) :].sum())(emb)
    assert jnp.all(g[0, : len(a)] == 0.0)


def test_scanned_and_unrolled_layouts_share_canonical_names():
    scanned, unrolled = _tiny(scan_layers=True), _tiny(scan_layers=False)
    params.set_params(unrolled, params.get_params(scanned))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 9)))
    np.testing.assert_allclose(scanned(ids), unrolled(ids), atol=1e-5)
    assert sorted(params.get_params(scanned)) == sorted(params.get_params(unrolled))


@pytest.mark.parametrize("kind,bias", [("layernorm", True), ("layernorm", False), ("rmsnorm", False)])
def test_norm_backward_equals_autodiff_of_the_formula(kind, bias):
    """Norm has a hand-written backward (model/layers.py _norm); it must equal autodiff of the plain
    formula for the input, the scale and the bias."""
    from podformer.model import layers

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)) * 2 + 0.5, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(32), jnp.float32)
    b = jnp.asarray(rng.standard_normal(32), jnp.float32) if bias else None
    probe = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)  # a non-uniform cotangent

    def reference(x, scale, b):
        if kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale
        return y if b is None else y + b

    def fused(x, scale, b):
        return layers._norm(x, scale, b, 1e-5, kind == "layernorm")

    def loss(f):
        return lambda *a: jnp.sum(jnp.tanh(f(*a)) * probe)

    argnums = (0, 1, 2) if bias else (0, 1)
    want = jax.grad(loss(reference), argnums=argnums)(x, scale, b)
    got = jax.grad(loss(fused), argnums=argnums)(x, scale, b)
    np.testing.assert_allclose(fused(x, scale, b), reference(x, scale, b), atol=2e-6)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)
