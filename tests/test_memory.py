"""Pod-scale memory: the compile-only memory breakdown (issue 15)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from podformer import aot, memory
from podformer import config as config_lib
from podformer.model import families
from tests.helpers import REPO, SMALL, env

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs the [aot] extra: pip install -e '.[aot]'"
)

GIB = 2.0**30


def compiled_report(args: list[str], spec: str) -> dict:
    """One compile of the train step for ``spec`` with the memory breakdown (no cost probes)."""
    cfg, _ = config_lib.parse_args(args, "configs/gpt.py:tiny", {"workdir": "", "compile_only": ""})
    family = families.get(cfg.model.family)
    model_cfg = config_lib.family_config(cfg.model, family.config)
    make = lambda rngs: family.module_class()(model_cfg, rngs=rngs)  # noqa: E731
    return aot.compile_train_step(spec, make_model=make, quiet=True, breakdown=True, **aot.step_kwargs(cfg))


@needs_libtpu
@pytest.mark.slow
def test_the_memory_breakdown_lists_buffers_that_sum_to_the_temporaries():
    # Two narrow layers and a long batch: a program that compiles in seconds whose temporaries (~0.5 GiB
    # per chip, mostly the L x S attention scores of XLA attention) are in HBM, not in the chips' VMEM.
    args = ["--config.train.batch_size=32", "--config.train.seq_len=1024", "--config.model.max_len=1024"]
    r = compiled_report(args, "v5e:2x2")
    buffers = r["buffers"]
    listed = sum(b.credited for b in buffers) / GIB
    print(f"temporaries {r['temporaries_gib']:.3f} GiB, listed {listed:.3f} GiB in {len(buffers)} buffers")
    for b in buffers[:5]:
        print(f"  {b.credited / GIB:.3f} GiB {b.shape} {b.instruction}: {b.op}")
    assert r["temporaries_gib"] > 0.1
    assert abs(listed - r["temporaries_gib"]) <= 0.05 * r["temporaries_gib"]
    # Largest first, each named after the op that makes it; the largest is attention's (B, H, L, S) scores.
    assert [b.credited for b in buffers] == sorted((b.credited for b in buffers), reverse=True)
    assert all(b.op for b in buffers[:5])
    assert "1024,1024]" in buffers[0].shape, buffers[0]
    assert sum(size for _, size, _ in memory.by_op(buffers)) == sum(b.credited for b in buffers)


def test_credited_bytes_never_count_a_byte_twice():
    # Hand-worked: a 100-byte allocation; A [0, 60), B [40, 100) overlaps A's last 20, C [10, 30) inside A.
    values = [("a", 60, 0, "x"), ("b", 60, 40, "y"), ("c", 20, 10, "z")]
    credited = {v[0]: n for v, n in memory._credit(100, values)}
    assert credited == {"a": 60, "b": 40, "c": 0}


def test_the_live_buffers_at_the_heap_peak_are_read_from_the_live_range_dump():
    text = """HloLiveRange (max 9):
  BufferLiveRange:
    fusion.1{}:0-5
  Live ranges at 4 (peak):
    while.3{2}: 1073741824 bytes (cumulative: 1073741824 bytes)
    fusion.1{}: 939524096 bytes (cumulative: 2013265920 bytes)
  Stack trace breakdown for peak usage: 2 013 265 920 bytes
    main (100.0%, total: 2 013 265 920 bytes)
"""
    assert memory.peak_live(text) == [("while.3{2}", 2**30), ("fusion.1{}", 939524096)]


def test_flash_attention_under_a_data_fsdp_tensor_mesh_equals_xla():
    # The Pallas kernel in a shard_map over rows (data x fsdp) and heads (tensor) on 8 fake CPU devices,
    # in Pallas' interpreter: values and gradients against XLA attention on one device.
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from podformer.configs.common import RULES
    from podformer.model import attention

    B, L, H, K = 4, 128, 2, 8
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (B, L, H, K)) for x in (k1, k2, k3))
    seg = jnp.concatenate([jnp.ones((B, 96), jnp.int32), 2 * jnp.ones((B, 32), jnp.int32)], axis=1)
    mask = attention.make_attention_mask(seg, seg, causal=True)
    segments = attention.SegmentMask(seg, seg, causal=True)  # the kernel's own segment and causal masking

    def f(impl, mask, q, k, v):
        out = attention.attention(q, k, v, mask_B1LS=mask, scale=0.3, impl=impl)
        return jnp.sum(out * jnp.cos(out)), out

    grad = jax.jit(jax.value_and_grad(f, argnums=(2, 3, 4), has_aux=True), static_argnums=0)
    (_, ref), ref_grads = grad("xla", mask, q, k, v)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES), attention.pallas_mode(interpret=True):
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor"))
        q, k, v = (jax.device_put(x, spec) for x in (q, k, v))
        results = [grad("flash", m, q, k, v) for m in (mask, segments)]  # as a bias; as segment ids
        assert attention.resolve_auto(q, k, 0.0, None)[0] == "flash"  # interpret mode stands for a TPU
    for (_, out), grads in results:
        np.testing.assert_allclose(out, ref, atol=1e-5)
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-5)


# train.py in one process on 8 fake devices, once per attention kernel, with the Pallas kernels in
# Pallas' interpreter: {kernel: {step: loss}}.
_TRAIN_BOTH = """
import json, sys, tempfile
import train
from podformer.model import attention
from tests.helpers import train_losses
out = {}
for impl in ("xla", "flash"):
    workdir = tempfile.mkdtemp()
    with attention.pallas_mode(interpret=True):
        train.run([*sys.argv[1:], f"--config.model.attention_impl={impl}", f"--workdir={workdir}"])
    out[impl] = train_losses(workdir)
print("LOSSES", json.dumps(out))
"""


@pytest.mark.slow
def test_training_losses_with_flash_under_a_data_fsdp_tensor_mesh_equal_xla():
    # The whole train step (packed rows, GPT's causal SegmentMask, remat, the optimizer) with the Pallas
    # kernel in its shard_map over data x fsdp rows and tensor heads: the losses of XLA attention.
    args = [*SMALL, "--config.model.num_layers=1", "--config.train.seq_len=128", "--config.model.max_len=128"]
    args += ["--config.train.batch_size=8", "--config.train.steps=3", "--config.checkpoint.every=100"]
    args += ["--config.train.eval_steps=0", "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    proc = subprocess.run(
        [sys.executable, "-c", _TRAIN_BOTH, *args], cwd=REPO, env=env(8), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}" in proc.stdout
    losses = json.loads(proc.stdout.split("LOSSES", 1)[1])
    assert sorted(losses["xla"]) == ["1", "2", "3"]
    for step, loss in losses["xla"].items():
        assert abs(losses["flash"][step] - loss) <= 1e-5 * abs(loss), (step, losses)


def test_auto_attention_is_xla_on_cpu_with_the_reason():
    import jax.numpy as jnp

    from podformer.model import attention

    q = jnp.zeros((1, 128, 2, 8))
    assert attention.resolve_auto(q, q, 0.0, None) == ("xla", "no fused attention kernel on cpu")
    with attention.pallas_mode(target="tpu"):
        assert attention.resolve_auto(q, q, 0.0, None) == ("flash", "Pallas flash on TPU")
        impl, why = attention.resolve_auto(q[:, :100], q[:, :100], 0.0, None)
        assert impl == "xla" and "multiples of 128" in why


@needs_libtpu
@pytest.mark.slow
def test_auto_attention_on_a_v5p_fsdp_tensor_mesh_compiles_the_pallas_kernel():
    # model.attention_impl=auto compiled for TPUs picks the Pallas flash kernel, and its shard_map lets
    # the TPU compiler lower it under fsdp x tensor ("Mosaic kernels cannot be automatically partitioned"
    # otherwise): the kernel's custom call is in the compiled program.
    args = ["--config.model.attention_impl=auto", "--config.mesh.data=1", "--config.mesh.fsdp=2"]
    args += ["--config.mesh.tensor=2", "--config.train.batch_size=8", "--config.train.seq_len=128"]
    r = compiled_report(args, "v5p:2x2x1")
    assert r["mesh"] == {"data": 1, "fsdp": 2, "expert": 1, "tensor": 2}
    assert "tpu_custom_call" in r["hlo_custom_calls"], r["hlo_custom_calls"]
