"""Multislice: a hybrid ICI x DCN mesh whose data/fsdp axes span slices outermost, so that only data and
fsdp traffic crosses the data-centre network; compile-only TPU topologies of several slices; a 2-slice run
trains exactly as one slice does."""

import importlib.util

import jax
import ml_collections
import numpy as np
import pytest

from podformer import mesh as mesh_lib
from podformer.core.errors import UserError

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs the [aot] extra: pip install -e '.[aot]'"
)


def mesh_cfg(data, fsdp, tensor, dcn_data=-1, dcn_fsdp=1, stage=1, dcn_stage=1):
    return ml_collections.ConfigDict(
        dict(data=data, fsdp=fsdp, tensor=tensor, devices=0, dcn_data=dcn_data, dcn_fsdp=dcn_fsdp, stage=stage)
        | dict(dcn_stage=dcn_stage)
    )


def test_slice_specs_parse_with_their_count():
    from podformer import aot

    assert aot.parse_topology("v4-4096x2")[1:] == ("v4:8x16x16", 2)
    assert aot.parse_topology("v5p:2x2x2x2")[1:] == ("v5p:2x2x2", 2)
    assert aot.parse_topology("v5e-16")[1:] == ("v5e:4x4", 1)
    with pytest.raises(UserError, match="two slices"):
        aot.parse_topology("v5p:2x2")


@needs_libtpu
def test_two_tpu_slices_put_the_dcn_axis_outermost_and_keep_tensor_groups_in_a_slice():
    from podformer import aot

    _, devices = aot.topology_devices("v5p:2x2x2x2")  # 2 slices of 8 chips
    assert sorted({d.slice_index for d in devices}) == [0, 1]
    assert mesh_lib.describe(devices).startswith("2 slices of 8 ")
    # data parallel across the slices (dcn_data=-1: all of them), fsdp x tensor within
    mesh = mesh_lib.make_mesh(mesh_cfg(1, 4, 2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    # fsdp across the slices: its outer half on slice 0, and each tensor pair on one slice's neighbours
    mesh = mesh_lib.make_mesh(mesh_cfg(2, 2, 2, dcn_data=1, dcn_fsdp=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[:, :2] == 0).all() and (slices[:, 2:] == 1).all()
    for pair in mesh.devices.reshape(-1, 2):
        a, b = pair
        assert a.slice_index == b.slice_index and sum(abs(x - y) for x, y in zip(a.coords, b.coords, strict=True)) == 1
    with pytest.raises(UserError) as e:
        mesh_lib.make_mesh(mesh_cfg(-1, 1, 1, dcn_data=4), devices)
    assert "\n" not in str(e.value) and "in 2" in str(e.value) and "mesh.dcn_data=2" in str(e.value)


def test_fake_devices_split_into_slices_and_the_per_slice_groups_follow_the_config():
    devices = jax.devices()[:8]
    mesh = mesh_lib.make_mesh(mesh_cfg(1, 2, 2, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert sorted(ids[0].flat) == [d.id for d in devices[:4]] and sorted(ids[1].flat) == [d.id for d in devices[4:]]
    with pytest.raises(UserError, match="per slice"):
        mesh_lib.make_mesh(mesh_cfg(1, 3, 1, dcn_data=2), devices)


def _losses(mesh, steps=5):
    import optax
    from flax import nnx

    from podformer import trainer
    from podformer.configs import gpt as gpt_configs
    from podformer.losses import LOSSES
    from podformer.model import gpt

    cfg = gpt_configs.get_config("tiny")
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    model_cfg = gpt.GPTConfig.tiny(vocab_size=256, max_len=32, d_model=32, num_layers=2, num_heads=4)
    graphdef, state, _ = trainer.create_state(lambda r: gpt.GPT(model_cfg, rngs=r), optax.adam(1e-2), mesh, rules, 0)
    rng = np.random.default_rng(0)
    B, L = 8, 32
    out = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step = jax.jit(
            lambda s, b: trainer.train_step(
                s, b, graphdef=graphdef, loss=LOSSES["causal_lm"], accum=1, seed=0, mesh=mesh,
                rules=rules, global_batch=B, schedule=lambda _: 0.0,
            )
        )  # fmt: skip
        for _ in range(steps):
            tokens = rng.integers(0, 256, (B, L + 1)).astype(np.int32)
            batch = {
                "inputs": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "segment_ids": np.ones((B, L), np.int32),
                "positions": np.tile(np.arange(L, dtype=np.int32), (B, 1)),
                "loss_weights": np.ones((B, L), np.float32),
            }
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
    return np.asarray(out)


@pytest.mark.slow
def test_a_two_slice_run_trains_as_one_slice():
    """First 5 losses: 2 slices x (fsdp 2 x tensor 2) on 8 fake devices against one device, within 1e-5."""
    devices = jax.devices()
    one = _losses(mesh_lib.make_mesh(mesh_cfg(1, 1, 1), devices[:1]))
    two = _losses(mesh_lib.make_mesh(mesh_cfg(1, 2, 2, dcn_data=2), devices[:8]))
    assert np.isfinite(one).all() and one[-1] < one[0]
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_pipeline_stages_across_slices_put_each_stage_on_its_slice():
    """mesh.dcn_stage: stage s on slice s // mesh.stage, the per-slice axes as configured within each."""
    devices = jax.devices()[:8]
    ids = lambda mesh: np.vectorize(lambda d: d.id)(mesh.devices)  # noqa: E731
    mesh = mesh_lib.make_mesh(mesh_cfg(1, 2, 2, stage=1, dcn_stage=2), devices)
    assert dict(mesh.shape) == {"stage": 2, "data": 1, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sorted(ids(mesh)[0].flat) == [d.id for d in devices[:4]] and sorted(ids(mesh)[1].flat) == [
        d.id for d in devices[4:]
    ]
    # 2 stages within each of 2 slices: 4 stages, 0 and 1 on the first slice
    mesh = mesh_lib.make_mesh(mesh_cfg(1, 2, 1, stage=2, dcn_stage=2), devices)
    assert dict(mesh.shape) == {"stage": 4, "data": 1, "fsdp": 2, "expert": 1, "tensor": 1}
    assert [sorted(ids(mesh)[s].flat) for s in range(4)] == [
        [d.id for d in devices[2 * s : 2 * s + 2]] for s in range(4)
    ]
    # with data parallel across slices too: slices ordered stage-major
    mesh = mesh_lib.make_mesh(mesh_cfg(1, 2, 1, dcn_data=2, dcn_stage=2), devices)
    assert dict(mesh.shape) == {"stage": 2, "data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    assert sorted(ids(mesh)[0, 0].flat) == [d.id for d in devices[:2]]
    assert sorted(ids(mesh)[0, 1].flat) == [d.id for d in devices[2:4]]
    assert sorted(ids(mesh)[1].flat) == [d.id for d in devices[4:]]
    with pytest.raises(UserError, match="mesh.dcn_stage, mesh.dcn_data .* got 0") as e:
        mesh_lib.make_mesh(mesh_cfg(1, 1, 1, dcn_stage=0), devices)
    assert "\n" not in str(e.value)


@needs_libtpu
def test_pipeline_stages_across_tpu_slices_keep_each_stage_on_one_slice():
    from podformer import aot

    _, devices = aot.topology_devices("v5p:2x2x2x2")  # 2 slices of 8 chips
    mesh = mesh_lib.make_mesh(mesh_cfg(1, 4, 2, dcn_stage=2), devices)
    assert dict(mesh.shape) == {"stage": 2, "data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    with pytest.raises(UserError, match="does not divide the 2 slice"):
        mesh_lib.make_mesh(mesh_cfg(-1, 1, 1, dcn_stage=2, dcn_fsdp=2, dcn_data=-1), devices)
