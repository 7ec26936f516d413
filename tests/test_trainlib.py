"""The training library's small parts: optimizer masks and schedule, mesh shapes, checkpoint hygiene."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from podformer import checkpoint, optim
from podformer import mesh as mesh_lib
from podformer.configs import gpt as gpt_configs
from podformer.core.errors import UserError
from podformer.model import gpt


def test_no_weight_decay_on_biases_and_norms():
    cfg = gpt_configs.get_config("tiny")
    model = gpt.GPT(gpt.GPTConfig.tiny(vocab_size=64, d_model=32, num_layers=2, num_heads=2), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    with cfg.unlocked():
        cfg.opt.clip_norm = 0.0
        cfg.opt.weight_decay = 0.5
    tx = optim.make_optimizer(cfg.opt, 100)
    zero_grads = jax.tree.map(np.zeros_like, params)
    state = tx.init(params)
    for _ in range(cfg.opt.warmup_steps + 1):  # past warmup, so the learning rate is not zero
        updates, state = tx.update(zero_grads, state, params)
    flat = {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(updates)}
    decayed = {k for k, v in flat.items() if np.any(v != 0)}
    assert decayed == {k for k in flat if k.endswith("kernel") or k in ("embed", "pos_embed")}
    assert not any(k.endswith(("bias", "scale")) for k in decayed)


def test_warmup_then_cosine_to_the_floor():
    cfg = gpt_configs.get_config("tiny").opt
    s = optim.schedule(cfg, 1000)
    assert float(s(0)) == 0.0
    assert float(s(cfg.warmup_steps)) == pytest.approx(cfg.lr)
    assert float(s(1000)) == pytest.approx(cfg.lr * cfg.min_lr_ratio)
    values = [float(s(i)) for i in range(cfg.warmup_steps, 1001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_mesh_shapes():
    class M(dict):
        __getattr__ = dict.__getitem__

    # (data, fsdp, expert, tensor); a config without mesh.expert has one expert shard
    assert mesh_lib.resolve_shape(M(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 1, 2)
    assert mesh_lib.resolve_shape(M(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1, 1)
    assert mesh_lib.resolve_shape(M(data=1, fsdp=2, expert=-1, tensor=1), 8) == (1, 2, 4, 1)
    with pytest.raises(UserError, match="only one of"):
        mesh_lib.resolve_shape(M(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(UserError, match="divisible by 3"):
        mesh_lib.resolve_shape(M(data=-1, fsdp=3, tensor=1), 8)


def test_killed_saves_are_ignored_and_cleaned_up(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False)
    state = {"w": np.arange(4.0)}
    ckpt.save(3, state, {"step": 3}, {"note": "ok"}, force=True)
    ckpt.close()
    leftover = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp"
    leftover.mkdir()
    (leftover / "partial").write_text("half a save")
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, async_save=False)
    assert ckpt.latest_step() == 3
    assert not leftover.exists()
    restored, data_state, meta = ckpt.restore(3, {"w": jax.ShapeDtypeStruct((4,), np.float64)})
    assert data_state == {"step": 3} and meta == {"note": "ok"}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4.0))
    ckpt.close()


def test_adamw_matches_optax_reference_on_a_quadratic():
    # Our optimizer is optax's AdamW plus clipping and masking: with those off, identical to optax.adamw.
    cfg = gpt_configs.get_config("tiny").opt
    with cfg.unlocked():
        cfg.clip_norm, cfg.weight_decay = 0.0, 0.0
    ours, ref = (
        optim.make_optimizer(cfg, 50),
        optax.adamw(optim.schedule(cfg, 50), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.0),
    )
    p = {"w": np.ones(3, np.float32)}
    s1, s2 = ours.init(p), ref.init(p)
    for _ in range(5):
        g = {"w": p["w"] * 2}
        u1, s1 = ours.update(g, s1, p)
        u2, s2 = ref.update(g, s2, p)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)
