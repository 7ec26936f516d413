"""float32 matmuls on a CPU through the host's BLAS (the OpenBLAS numpy ships), as XLA custom calls.

The opt-in CPU path behind model/kernels.py (``PODFORMER_CPU_MATMUL=blas``); XLA's own ops are the
default. ``matmul`` hands a rank-2 (or batched rank-3) float32 product to ``csrc/host_gemm.cc``: an XLA
FFI handler that splits it over XLA's own intra-op threads and calls numpy's ``sgemm`` once per part;
``softmax_cross_entropy`` is the language-model head's loss and logits gradient in one pass per row.
``load`` builds the handlers with the host's C++ compiler (``-march=native``) once per machine, keyed by
the CPU's identity, the compiler, jaxlib and the source, and registers them; it is called eagerly when
the path is chosen, never inside a trace. A failed build is recorded next to where the library would
be, so other processes do not try again: the path then says so once and XLA's ops stay.

Its speed depends on the machine's OpenBLAS more than on this code: numpy's OpenBLAS picks its kernels
by CPU at load time, and ``OPENBLAS_CORETYPE`` (set on some CI machines) can pin it to older, slower
ones. OpenBLAS also gives identical rows different bits depending on where they sit in the matrix, so
bit-exact invariants (causality, padding) hold on XLA's path only; this path equals XLA's within 1e-5
(tests/test_host_blas.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
TARGET = "podformer_host_gemm"
XENT_TARGET = "podformer_softmax_cross_entropy"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "host_gemm.cc")
# Built on the host it runs on, so for this CPU's vector units. No -ffast-math: NaNs must survive.
# Without -fno-trapping-math GCC keeps the softmax loops' exp scalar-speed (4x slower).
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros")
FLAGS += ("-std=c++17", "-shared", "-fPIC", "-w")
# /proc/cpuinfo fields that say which instructions -march=native may use: x86's model and feature flags,
# aarch64's implementer/part numbers and features (it has no model name). Per-core lines are deduplicated.
CPU_FIELDS = ("vendor_id", "model name", "flags", "cpu family", "model\t", "CPU implementer", "CPU architecture")
CPU_FIELDS += ("CPU variant", "CPU part", "CPU revision", "Features", "isa", "uarch")


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


def cpu_id(cpuinfo: bytes | None = None) -> bytes:
    """What -march=native compiles for: the architecture and /proc/cpuinfo's model and feature fields
    (x86: model name, flags; aarch64: CPU implementer/part, Features). A cache shared between machines
    (a home directory on NFS) must not hand one CPU's build to another."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", "rb") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = b""
    fields = tuple(f.encode() for f in CPU_FIELDS)
    lines = sorted({ln.strip() for ln in cpuinfo.splitlines() if ln.startswith(fields)})
    return b"\n".join([platform.machine().encode(), *lines])


def _compiler() -> tuple[str, str]:
    """(the C++ compiler's command, its version line), or (command, "") when it does not run."""
    cxx = os.environ.get("CXX", "c++")
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return cxx, ""
    return cxx, (proc.stdout.splitlines() or [""])[0] if proc.returncode == 0 else ""


def build_key(cxx: str, version: str, include: str) -> str:
    """The cache key of one build: source, flags, jaxlib (its FFI headers), compiler and CPU."""
    with open(SOURCE, "rb") as f:
        parts = [f.read(), " ".join(FLAGS).encode(), include.encode(), jax.__version__.encode()]
    parts += [cxx.encode(), version.encode(), cpu_id()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build() -> tuple[str | None, str]:
    """(path of the built library, "") or (None, why not). Tried once per machine and key: a failure is
    written to ``<key>.failed`` and read back by every later process (delete it to try again). A
    compiler installed later changes the key, so it is tried then."""
    include = jax.ffi.include_dir()
    cxx, version = _compiler()
    key = build_key(cxx, version, include)
    folder = os.path.join(_cache_dir(), "host_blas")
    out, failed = os.path.join(folder, f"host_gemm-{key}.so"), os.path.join(folder, f"host_gemm-{key}.failed")
    if os.path.exists(out):
        return out, ""
    if os.path.exists(failed):
        with open(failed, errors="replace") as f:
            return None, f"{f.read().strip()} (recorded in {failed}; delete it to try again)"
    os.makedirs(folder, exist_ok=True)
    if not version:
        why = f"no C++ compiler: `{cxx} --version` did not run (install g++, or point CXX at one)"
        _atomic_write(failed, why.encode())
        return None, why
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cxx, *FLAGS, f"-I{include}", SOURCE, "-o", tmp], capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0:
            why = f"{cxx} failed building {SOURCE}: {' '.join(proc.stderr.split())[:300]}"
            _atomic_write(failed, why.encode())
            return None, why
        os.replace(tmp, out)  # atomic: processes building at the same time all end with one complete file
    except subprocess.TimeoutExpired:  # a loaded machine, not a broken compiler: not recorded
        return None, f"{cxx} took over 600 s building {SOURCE}"
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out, ""


_loaded = False


@functools.cache
def load() -> bool:
    """Build (once per machine) and register the handlers; False, said once on stderr, to stay on XLA.
    Call it before tracing (model/kernels.py does, when the path is chosen)."""
    global _loaded
    blas = _loaded_blas()
    why = "numpy's BLAS has no cblas_sgemm this process can find (not OpenBLAS, or not Linux)"
    path = None
    if blas is not None:
        path, why = build()
    if path is not None:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            path, why = None, f"loading {path} failed: {e}"
    if path is None:
        print(f"podformer: PODFORMER_CPU_MATMUL=blas: {why}; CPU matmuls stay on XLA's own ops.", file=sys.stderr)
        return False
    lib.PodformerSetBlas.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    lib.PodformerSetBlas(blas.sgemm, blas.set_threads, int(blas.ilp64))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.HostGemm), platform="cpu")
    jax.ffi.register_ffi_target(XENT_TARGET, jax.ffi.pycapsule(lib.SoftmaxCrossEntropy), platform="cpu")
    _loaded = True
    return True


def loaded() -> bool:
    """Whether ``load`` has run and succeeded (never builds: safe inside a trace)."""
    return _loaded


def _check_loaded() -> None:
    if not _loaded:  # a bug in the caller, not bad input: kernels.py loads before it dispatches here
        raise RuntimeError("host_blas.load() must succeed before host_blas ops are traced")


def matmul(a: Array, b: Array, *, transpose_a: bool = False, transpose_b: bool = False) -> Array:
    """op(a) @ op(b) for float32 arrays on the host BLAS: rank 2, or rank 3 for a batch of products
    (op transposes the last two dims)."""
    _check_loaded()
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
    _check_loaded()
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
