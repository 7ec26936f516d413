"""Performance tooling: AOT compilation for a TPU topology, profiler traces, the benchmark suite."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from podformer import aot, profiling
from podformer.core.errors import UserError
from tests.helpers import REPO, SMALL, env


@pytest.mark.parametrize(
    "spec, topology",
    [
        ("v5p:2x2x2", "v5p:2x2x2"),
        ("v5p-8", "v5p:2x2x1"),
        ("v5p-64", "v5p:2x4x4"),
        ("v5p-128", "v5p:4x4x4"),
        ("v4-32", "v4:2x2x4"),
        ("v5e-16", "v5e:4x4"),
        ("v5litepod-8", "v5e:2x4"),
        ("v6e-256", "v6e:16x16"),
    ],
)
def test_named_slices_map_to_cloud_tpu_topologies(spec, topology):
    assert aot.parse_topology(spec)[1] == topology


@pytest.mark.parametrize("spec", ["v5p", "v9:2x2", "v5p:2x2", "v5e-12", "v5p-7"])
def test_bad_topologies_are_one_line_user_errors(spec):
    with pytest.raises(UserError) as e:
        aot.parse_topology(spec)
    assert "\n" not in str(e.value)


def _compile_only(*args):
    # A subprocess: libtpu, once loaded, stays registered in the process that loaded it.
    e = env(JAX_PLATFORMS="cpu")  # this host computes nothing: no TPU backend to look for
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "train.py", *SMALL, *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs the [aot] extra: pip install -e '.[aot]'")
def test_compile_only_refuses_what_mesh_strict_refuses(tmp_path):
    """The compile-only answer for a slice is the one a run there would get: strict replication is an error."""
    heads = ["--config.model.num_heads=5", "--config.model.head_dim=16", "--config.mesh.tensor=2"]
    proc = _compile_only(*heads, "--config.mesh.strict=true", f"--workdir={tmp_path}", "--compile_only=v5e:2x2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("podformer: error: mesh.strict: num_heads=5 is not divisible by mesh.tensor=2")


def test_profile_steps_parse():
    assert profiling.parse_steps("") == []
    assert profiling.parse_steps("5") == [(5, 5)]
    assert profiling.parse_steps("10-12, 3") == [(3, 3), (10, 12)]
    for bad in ("x", "0", "5-3"):
        with pytest.raises(UserError):
            profiling.parse_steps(bad)


def test_profiler_writes_a_trace_of_the_chosen_steps(tmp_path):
    prof = profiling.Profiler(ml_collections.ConfigDict({"steps": "2-3"}), str(tmp_path))
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((64, 64))
    for step in range(1, 5):
        prof.before_step(step)
        x = f(x)
        prof.after_step(step, x)
        assert prof.active == (step == 2)
    prof.close()
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1


def test_benchmark_suite_writes_json(tmp_path):
    # The decoder-cpu shape shrunk, one round: every field the README table and the issue ask for.
    from benchmarks import throughput

    small = ["--config.model.vocab_size=4096", "--config.model.d_model=32", "--config.model.num_layers=1"]
    small += ["--config.train.seq_len=32"]  # the tokenizer of configs/gpt.py:tiny (vocab 4096): cached
    shape = throughput.BY_NAME["decoder-cpu"]
    r = throughput.run_shape(shape, steps=1, warmup=1, rounds=1, torch=False, extra=small)
    for key in ("step_time_s", "tokens_per_sec", "model_tflops_per_device", "mfu", "compile_s", "pipeline_step_time_s"):
        assert r[key] > 0, key
    assert r["memory_per_device"]["peak_mib"] > 0 and r["matmul_ceiling_flops"] > 0
    json.dumps(r)


def test_benchmark_runs_combine_into_medians_over_processes():
    """--runs=N: each figure is the median over the N process runs; every run's figures are kept."""
    from benchmarks import throughput

    def report(step, speedup, torch_tps):
        shape = {"shape": "decoder-cpu", "config": "c", "step_time_s": step, "mfu": 0.5 / step, "rounds": [step]}
        shape.update(speedup_vs_torch=speedup, torch={"threads": 2, "step_time_s": 1.0, "tokens_per_sec": torch_tps})
        return {"shapes": [shape, {"shape": "encoder-tpu", "skipped": "no TPU"}]}

    merged = throughput.combine_runs([report(1.0, 1.2, 100.0), report(3.0, 0.8, 300.0), report(2.0, 1.0, 200.0)])
    decoder, skipped = merged
    assert decoder["step_time_s"] == 2.0 and decoder["speedup_vs_torch"] == 1.0 and decoder["mfu"] == 0.25
    assert decoder["torch"]["tokens_per_sec"] == 200.0 and decoder["torch"]["threads"] == 2
    assert [r["step_time_s"] for r in decoder["runs"]] == [1.0, 3.0, 2.0] and "rounds" not in decoder
    assert skipped == {"shape": "encoder-tpu", "skipped": "no TPU"}


def test_gpu_h200_script_is_a_1p3b_decoder_and_refuses_cpu():
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_h200.py"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "no GPU here" in proc.stderr
    from podformer import trainer
    from podformer.model.gpt import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=50304, max_len=2048, d_model=2048, num_layers=24, num_heads=16, d_ff=8192)
    _, abstract = trainer.abstract_state(lambda r: GPT(cfg, rngs=r), __import__("optax").sgd(0.1), 0)
    n = sum(int(jnp.prod(jnp.array(s))) for s in trainer.named_param_shapes(abstract).values())
    assert 1.3e9 <= n <= 1.5e9, n
