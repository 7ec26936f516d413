"""float32 matmuls on a CPU through the host's BLAS (the OpenBLAS numpy ships), as an XLA custom call.

On the 2-core CPU benchmark shape XLA:CPU's own GEMMs (YNNPACK/Eigen) reach 110-165 GFLOP/s on the
language-model head's 2048 x 256 x 32000 products where OpenBLAS reaches 170-270 with the same cores,
and a training step there is ~85% GEMMs. ``matmul`` hands a rank-2 float32 product to
``csrc/host_gemm.cc``: an XLA FFI handler that splits it over XLA's own intra-op threads and calls
numpy's ``sgemm`` once per part. It is used (``enabled``) only where it is exact and cheap to get
right: on the CPU backend, for float32 operands, outside any multi-device mesh (XLA would gather
the operands of a custom call), and with a C++ compiler on the host to build the handler once
(cached under ``$PODFORMER_CACHE``). Everything else -- accelerators, bf16, sharded meshes, ahead-of-
time compilation for a TPU -- keeps XLA's dot, as does ``PODFORMER_CPU_MATMUL=xla``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
TARGET = "podformer_host_gemm"
XENT_TARGET = "podformer_softmax_cross_entropy"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "host_gemm.cc")

_state = threading.local()


@dataclasses.dataclass(frozen=True)
class _Blas:
    sgemm: int  # address of cblas_sgemm
    set_threads: int  # address of openblas_set_num_threads_local, 0 if this BLAS has none
    ilp64: bool  # 64-bit integer interface


def _loaded_blas() -> _Blas | None:
    """numpy's own BLAS, found among the libraries this process has mapped (numpy loads it at import)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "blas" in ln.rsplit("/", 1)[-1].lower()}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name, ilp64 in (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True), ("cblas_sgemm", False)):
            if hasattr(lib, name):
                setter = getattr(lib, "openblas_set_num_threads_local", None)
                address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
                return _Blas(address(getattr(lib, name)), address(setter) if setter else 0, ilp64)
    return None


def _cache_dir() -> str:
    return os.environ.get("PODFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "podformer")


def _cpu_id() -> bytes:
    """The CPU model and feature flags: a cache shared between machines must not mix -march=native builds."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({ln for ln in f if ln.startswith((b"model name", b"flags"))}))
    except OSError:
        return b""


def _build() -> str:
    """Compile the handlers against this jaxlib's FFI headers, once per source, flags, jaxlib and CPU."""
    include = jax.ffi.include_dir()
    # Built on the host it runs on, so for this CPU's vector units. No -ffast-math: NaNs must survive.
    # Without -fno-trapping-math GCC keeps the softmax loops' exp scalar-speed (4x slower).
    flags = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros"]
    flags += ["-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}"]
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + " ".join(flags).encode() + jax.__version__.encode() + _cpu_id())
    out = os.path.join(_cache_dir(), "host_blas", f"host_gemm-{key.hexdigest()[:16]}.so")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=".tmp-", suffix=".so")
    os.close(fd)
    cmd = [os.environ.get("CXX", "c++"), *flags, SOURCE, "-o", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)  # atomic: concurrent test workers may build it at the same time
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


@functools.cache
def _library() -> _Blas | None:
    """The BLAS and the registered handler, or None (with one warning saying why) to stay on XLA."""
    blas = _loaded_blas()
    if blas is None:
        return None  # no OpenBLAS-style numpy here (macOS Accelerate, ...): XLA's dot, silently
    try:
        lib = ctypes.CDLL(_build())
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(
            f"podformer: CPU matmuls stay on XLA: building {SOURCE} failed ({detail.strip()[:300]}). "
            "Install a C++ compiler (g++) for faster float32 training on CPU, or set PODFORMER_CPU_MATMUL=xla "
            "to skip the attempt.",
            file=sys.stderr,
        )
        return None
    lib.PodformerSetBlas.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.PodformerSetBlas(blas.sgemm, blas.set_threads, int(blas.ilp64))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.HostGemm), platform="cpu")
    jax.ffi.register_ffi_target(XENT_TARGET, jax.ffi.pycapsule(lib.SoftmaxCrossEntropy), platform="cpu")
    return blas


@contextlib.contextmanager
def disabled():
    """Trace with XLA's dot only: for programs compiled for another platform on this host (AOT)."""
    saved = getattr(_state, "off", False)
    _state.off = True
    try:
        yield
    finally:
        _state.off = saved


def enabled(*arrays: Array) -> bool:
    """Whether a product of these arrays, traced now, goes to the host BLAS."""
    if getattr(_state, "off", False) or os.environ.get("PODFORMER_CPU_MATMUL", "blas") == "xla":
        return False
    if any(a.dtype != jnp.float32 for a in arrays) or jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return False
    return _library() is not None


def matmul(a: Array, b: Array, *, transpose_a: bool = False, transpose_b: bool = False) -> Array:
    """op(a) @ op(b) for float32 arrays on the host BLAS (``enabled`` must hold): rank 2, or rank 3 for a
    batch of products (op transposes the last two dims)."""
    _library()  # registers the handler
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


@jax.custom_vjp
def dense(x_MI: Array, w_IO: Array) -> Array:
    """x @ w with both gradients on the host BLAS as well."""
    return matmul(x_MI, w_IO)


def _dense_fwd(x_MI, w_IO):
    return matmul(x_MI, w_IO), (x_MI, w_IO)


def _dense_bwd(res, g_MO):
    x_MI, w_IO = res
    return matmul(g_MO, w_IO, transpose_b=True), matmul(x_MI, g_MO, transpose_a=True)


dense.defvjp(_dense_fwd, _dense_bwd)


def contract(x: Array, w: Array, n_in: int) -> Array:
    """``x``'s last ``n_in`` dims against ``w``'s first ``n_in`` (a Dense layer), on the host BLAS."""
    lead, inner, outer = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    size = lambda s: int(np.prod(s, dtype=np.int64))  # noqa: E731
    y = dense(x.reshape(size(lead), size(inner)), w.reshape(size(inner), size(outer)))
    return y.reshape(lead + outer)


def softmax_cross_entropy(logits_MV: Array, targets_M: Array, weights_M: Array, *, grad: bool):
    """Per row of float32 logits: (cross-entropy, 1.0 where the target's logit is the row maximum) and,
    with ``grad``, ``weights * (softmax - onehot(targets))``, the gradient of the weighted sum of the
    cross-entropies, written over the logits (one pass per row instead of XLA's three over the whole
    array). No autodiff: model/lm_head.py calls it inside its own custom VJP."""
    _library()  # registers the handler
    M, V = logits_MV.shape
    row = jax.ShapeDtypeStruct((M,), jnp.float32)
    call = jax.ffi.ffi_call(
        XENT_TARGET,
        (jax.ShapeDtypeStruct((M, V), jnp.float32), row, row),
        input_output_aliases={0: 0},
        vmap_method="sequential",
    )
    g, ce, correct = call(logits_MV, targets_M.astype(jnp.int32), weights_M.astype(jnp.float32), grad=grad)
    return (g if grad else None), ce, correct
