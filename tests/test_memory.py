"""Pod-scale memory: the compile-only memory breakdown (issue 15)."""

import importlib.util

import pytest

from podformer import aot, memory
from podformer import config as config_lib
from podformer.model import families

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
