"""Test setup: 8 fake CPU devices (set before JAX is imported), a shared data cache, helpers."""

import os
import sys

# Must happen before anything imports jax: tests that shard use 8 fake CPU devices. The tests' models are
# tiny and most of their time is XLA compiling them: LLVM's optimisation level 0 halves that (the default
# run, which trains for minutes, runs at the full level; see tests/helpers.py).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] += " " + "--xla_backend_optimization_level=0"
os.environ["PODFORMER_NO_PROGRESS"] = "1"
# XLA's own ops, as accelerators run them: the bit-exact invariants (causality, padding, locality) hold on
# them. tests/test_host_blas.py alone opts in to the host-BLAS path (model/kernels.py), whatever the
# developer's environment says.
os.environ["PODFORMER_CPU_MATMUL"] = "xla"
# With the [aot] extra installed, libtpu makes every JAX process look for a TPU first; tests run on CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def podformer_cache(tmp_path_factory):
    """One tokenizer/token cache for the whole session (subprocesses inherit it through the env).
    A developer can point PODFORMER_CACHE at a persistent directory to skip rebuilding it."""
    if not os.environ.get("PODFORMER_CACHE"):
        os.environ["PODFORMER_CACHE"] = str(tmp_path_factory.mktemp("podformer-cache"))
    return os.environ["PODFORMER_CACHE"]
