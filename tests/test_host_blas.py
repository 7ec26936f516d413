"""The opt-in CPU path (model/host_blas.py behind model/kernels.py) against numpy and against XLA's own
ops: every transposition, shapes that split over threads, gradients, a whole GPT step, where it must stay
off (bf16, multi-device meshes, programs compiled for a TPU), and its build: keyed by CPU identity, done
before tracing, tried once per machine. The only test file that opts in: the rest of the suite runs XLA's
ops (tests/conftest.py pins PODFORMER_CPU_MATMUL=xla). Run it with OPENBLAS_CORETYPE as the environment
has it and unset: both must pass."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from podformer.core.errors import UserError
from podformer.losses import causal_lm
from podformer.model import attention, host_blas, kernels, lm_head
from podformer.model.gpt import GPT, GPTConfig
from tests.helpers import REPO, env

pytestmark = pytest.mark.skipif(not host_blas.load(), reason="no OpenBLAS-style numpy or no C++ compiler here")

SHAPES = [(1, 1, 1), (5, 7, 3), (300, 513, 129), (257, 64, 1000), (4, 0, 3), (0, 5, 2)]  # (m, k, n)


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=lambda s: str(s))
def test_matmul_equals_numpy(m, k, n, transpose_a, transpose_b):
    # (300, 513, 129) and (257, 64, 1000) are big enough to be cut into parts, along m and along n.
    rng = np.random.default_rng(m * 7 + n)
    a = rng.standard_normal((k, m) if transpose_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if transpose_b else (k, n), dtype=np.float32)
    want = (a.T if transpose_a else a).astype(np.float64) @ (b.T if transpose_b else b).astype(np.float64)
    got = jax.jit(lambda a, b: host_blas.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b))(a, b)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * max(1, k) ** 0.5)


def test_concurrent_calls_do_not_deadlock():
    """Two independent GEMMs XLA may run at once on its 2-thread pool, each splitting over the pool."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((512, 512), dtype=np.float32) for _ in range(2))
    x, y = jax.jit(lambda a, b: (host_blas.matmul(a, b), host_blas.matmul(b, a, transpose_a=True)))(a, b)
    np.testing.assert_allclose(np.asarray(x), a @ b, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(y), b.T @ a, rtol=1e-4, atol=1e-3)


def test_dense_gradients_equal_xla():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 16), dtype=np.float32)
    w = rng.standard_normal((16, 3, 5), dtype=np.float32)

    def loss(contract):
        return lambda x, w: jnp.sum(jnp.tanh(contract(x, w)))

    blas = jax.jit(jax.value_and_grad(loss(lambda x, w: host_blas.contract(x, w, 1)), argnums=(0, 1)))(x, w)
    xla = jax.value_and_grad(loss(lambda x, w: jnp.einsum("BLD,DHK->BLHK", x, w)), argnums=(0, 1))(x, w)
    for got, want in zip(jax.tree.leaves(blas), jax.tree.leaves(xla), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def gpt_step(matmul: str):
    """Loss, gradients and the HLO of a tiny GPT's loss+grad, traced on the ``matmul`` path."""
    model = GPT(GPTConfig(vocab_size=96, max_len=32, d_model=32, num_layers=2, num_heads=4, d_ff=64), rngs=nnx.Rngs(0))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, (2, 33)).astype(np.int32)
    batch = {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.ones((2, 32), np.int32),
        "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (2, 32)),
        "loss_weights": np.ones((2, 32), np.float32),
    }
    denom = causal_lm.denominators(batch)

    def f(p):
        return causal_lm.fn(nnx.merge(graphdef, p, rest), batch, None, denom)[0]

    with kernels.use(matmul):
        fn = jax.jit(jax.value_and_grad(f))
        loss, grads = fn(p)
        return float(loss), grads, fn.lower(p).as_text()


def test_gpt_train_step_equals_xla():
    loss_xla, grads_xla, hlo_xla = gpt_step("xla")
    loss_blas, grads_blas, hlo_blas = gpt_step("blas")
    # The switch really switched, in every kernel: Dense, fused q/k/v, attention, the fused LM head.
    assert hlo_blas.count(host_blas.TARGET) >= 7 and host_blas.XENT_TARGET in hlo_blas
    assert host_blas.TARGET not in hlo_xla and host_blas.XENT_TARGET not in hlo_xla
    assert "dot_general" not in hlo_blas  # no matmul left to XLA
    assert abs(loss_blas - loss_xla) < 1e-5
    for a, b in zip(jax.tree.leaves(grads_blas), jax.tree.leaves(grads_xla), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fused_lm_head_equals_xla():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 16), dtype=np.float32)
    w = rng.standard_normal((50, 16), dtype=np.float32)
    t = rng.integers(0, 50, (2, 8))
    wt = (rng.random((2, 8)) > 0.2).astype(np.float32)
    results = []
    for matmul in ("xla", "blas"):
        with kernels.use(matmul):
            f = jax.jit(
                jax.value_and_grad(lambda x, w: lm_head.cross_entropy(x, w, t, wt, chunks=2)[0], argnums=(0, 1))
            )
            results.append(f(x, w))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_xla_is_the_default_and_blas_is_opt_in(monkeypatch):
    f32, bf16 = jnp.ones((4, 4), jnp.float32), jnp.ones((4, 4), jnp.bfloat16)
    assert kernels.mode() == "xla" and not kernels.host_path(f32, f32)  # the suite's pin (conftest.py)
    monkeypatch.delenv("PODFORMER_CPU_MATMUL")
    assert kernels._env_mode() == "xla"  # unset: XLA's ops
    monkeypatch.setenv("PODFORMER_CPU_MATMUL", "blas")
    assert kernels._env_mode() == "blas"
    monkeypatch.setenv("PODFORMER_CPU_MATMUL", "openblas")
    with pytest.raises(UserError, match="PODFORMER_CPU_MATMUL='openblas'; set it to 'xla'"):
        kernels._env_mode()
    # Read at import (outside the entries' error handling): the first kernel traced in the run says it.
    monkeypatch.setattr(kernels, "_bad_env", UserError("PODFORMER_CPU_MATMUL='openblas'; set it to 'xla' ..."))
    with pytest.raises(UserError, match="openblas"):
        kernels.contract(f32, f32, 1)
    monkeypatch.undo()
    with kernels.use("blas"):
        assert kernels.host_path(f32, f32)
        assert not kernels.host_path(f32, bf16)
        with kernels.use("xla"):  # podformer/aot.py: programs compiled for a TPU on this host
            assert not kernels.host_path(f32, f32)
        assert kernels.host_path(f32, f32)
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
        with jax.set_mesh(mesh):  # XLA would gather a custom call's operands onto every device
            assert kernels.host_path(f32, f32) == (jax.device_count() == 1)
    assert not kernels.host_path(f32, f32)


@pytest.mark.parametrize("grad", [False, True])
def test_softmax_cross_entropy_equals_xla(grad):
    rng = np.random.default_rng(3)
    M, V = 37, 1001  # rows split over threads; a vocabulary that is no multiple of the vector width
    logits = (rng.standard_normal((M, V)) * rng.uniform(0.1, 30, (M, 1))).astype(np.float32)
    logits[0, :] = -1e4  # a flat row: uniform softmax
    logits[1, 5] = 80.0  # one dominant logit: the rest of the row underflows
    targets = rng.integers(0, V, (M,)).astype(np.int32)
    targets[1] = 5
    weights = (rng.random(M) > 0.3).astype(np.float32) * 0.5
    g, ce, correct = jax.jit(lambda *a: host_blas.softmax_cross_entropy(*a, grad=grad))(logits, targets, weights)

    lse = jax.nn.logsumexp(logits, axis=-1)
    target = np.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(ce, lse - target, rtol=1e-6, atol=2e-5)
    np.testing.assert_array_equal(correct, (target >= logits.max(-1)).astype(np.float32))
    assert correct[1] == 1.0
    if grad:
        want = weights[:, None] * (jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(targets, V))
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    else:
        assert g is None


def test_softmax_cross_entropy_target_out_of_range_is_nan():
    logits = np.zeros((2, 8), np.float32)
    targets = np.array([3, 8], np.int32)
    _, ce, correct = host_blas.softmax_cross_entropy(logits, targets, np.ones(2, np.float32), grad=True)
    assert np.isfinite(ce[0]) and np.isnan(ce[1]) and np.isnan(correct[1])


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_equals_xla(kv_heads):
    """The CPU attention path (batched host-BLAS matmuls, flash-style backward) against XLA's
    jax.nn.dot_product_attention: packed segments with padding, causal, grouped key/value heads."""
    rng = np.random.default_rng(4)
    B, L, H, K = 2, 24, 4, 8
    q = rng.standard_normal((B, L, H, K), dtype=np.float32)
    k, v = (rng.standard_normal((B, L, kv_heads, K), dtype=np.float32) for _ in range(2))
    seg = np.array([[1] * 10 + [2] * 10 + [0] * 4, [1] * L], np.int32)
    mask = attention.make_attention_mask(jnp.asarray(seg), jnp.asarray(seg), causal=True)
    d_out = rng.standard_normal((B, L, H, K), dtype=np.float32)
    results = []
    for matmul in ("xla", "blas"):

        def f(q, k, v):
            return jnp.sum(attention.attention(q, k, v, mask_B1LS=mask, scale=K**-0.5) * d_out)

        with kernels.use(matmul):
            fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
            results.append((fn(q, k, v), fn.lower(q, k, v).as_text()))
    (want, hlo_xla), (got, hlo_blas) = results
    assert host_blas.TARGET in hlo_blas and host_blas.TARGET not in hlo_xla
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batched_matmul_equals_numpy():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 40, 30), dtype=np.float32)
    b = rng.standard_normal((6, 50, 30), dtype=np.float32)
    got = jax.jit(lambda a, b: host_blas.matmul(a, b, transpose_b=True))(a, b)
    np.testing.assert_allclose(got, a @ np.swapaxes(b, 1, 2), rtol=1e-5, atol=1e-4)


X86 = b"""processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512bw
cpu MHz\t\t: 2600.000
"""
ARM = b"""processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""


def test_build_is_keyed_by_cpu_identity():
    # Per-core repeats and clock readings do not matter; the model, its flags, and on aarch64 (no model
    # name) the implementer/part numbers and features do.
    assert host_blas.cpu_id(X86) == host_blas.cpu_id(X86 + X86.replace(b"processor\t: 0", b"processor\t: 1"))
    assert host_blas.cpu_id(X86) == host_blas.cpu_id(X86.replace(b"2600.000", b"3100.000"))
    assert host_blas.cpu_id(X86) != host_blas.cpu_id(X86.replace(b" avx512f avx512bw", b""))
    assert host_blas.cpu_id(X86) != host_blas.cpu_id(X86.replace(b"9B14", b"7B13"))
    assert host_blas.cpu_id(ARM) != host_blas.cpu_id(ARM.replace(b"0xd0c", b"0xd40"))  # Neoverse N1 vs V1
    assert host_blas.cpu_id(ARM) != host_blas.cpu_id(ARM.replace(b" asimddp", b" asimddp sve"))
    assert host_blas.cpu_id(ARM) != host_blas.cpu_id(ARM.replace(b"0x41", b"0x61"))
    key = host_blas.build_key("c++", "c++ (GCC) 12.2.0", "/inc")
    assert key == host_blas.build_key("c++", "c++ (GCC) 12.2.0", "/inc")
    assert key != host_blas.build_key("c++", "c++ (GCC) 14.2.0", "/inc") != host_blas.build_key("clang++", "", "/inc")


def test_a_failed_build_is_recorded_and_never_retried(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "fakecxx 1.0" && exit 0\necho build >> {log}\n'
                   'echo "error: no such header" >&2\nexit 1\n')  # fmt: skip
    cxx.chmod(0o755)
    monkeypatch.setenv("PODFORMER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    assert host_blas.build() == (None, f"{cxx} failed building {host_blas.SOURCE}: error: no such header")
    recorded = host_blas.build()  # a later process: reads the record, runs no compiler
    assert recorded[0] is None and "no such header (recorded in" in recorded[1] and log.read_text() == "build\n"
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert "no C++ compiler" in host_blas.build()[1]
    assert (
        "no C++ compiler" in host_blas.build()[1]
        and len(list((tmp_path / "cache" / "host_blas").glob("*.failed"))) == 2
    )


FRESH = textwrap.dedent("""
    import glob, os, sys
    import jax, jax.numpy as jnp
    from podformer.model import host_blas, kernels  # PODFORMER_CPU_MATMUL=blas: built (or not) here
    records = glob.glob(os.path.join(os.environ["PODFORMER_CACHE"], "host_blas", "*"))
    print("after import:", host_blas.loaded(), len(records), flush=True)
    x = jnp.ones((8, 8), jnp.float32)
    for _ in range(2):
        hlo = jax.jit(lambda a: kernels.contract(a, a, 1)).lower(x).as_text()
        print("host gemm in the program:", host_blas.TARGET in hlo, flush=True)
""")


def fresh_process(**extra) -> subprocess.CompletedProcess:
    e = env(PODFORMER_CPU_MATMUL="blas", **extra)
    return subprocess.run([sys.executable, "-c", FRESH], env=e, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_blas_builds_at_import_before_any_trace():
    # The suite's cache already holds this machine's build (this module loaded it): the fresh process
    # loads it at import, before anything is traced, and its programs call it.
    proc = fresh_process()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("after import: True")
    assert proc.stdout.count("host gemm in the program: True") == 2 and "podformer:" not in proc.stderr


def test_without_a_compiler_it_says_so_once_and_stays_on_xla(tmp_path):
    proc = fresh_process(PODFORMER_CACHE=tmp_path, CXX=tmp_path / "no-such-compiler")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "after import: False 1"  # the failure is recorded at import
    assert proc.stdout.count("host gemm in the program: False") == 2
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("podformer:")]
    assert len(said) == 1 and "no C++ compiler" in said[0] and "stay on XLA's own ops" in said[0], proc.stderr
