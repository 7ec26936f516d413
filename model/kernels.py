"""The block library's one switch between XLA's own ops and the opt-in host-BLAS path on CPUs.

XLA's ops are the default everywhere: they are what TPUs and GPUs run, and what the suite's bit-exact
invariants (causality, padding, locality) hold on. A CPU process opts in to model/host_blas.py with
``PODFORMER_CPU_MATMUL=blas`` (read when this module is imported) or, for a block of code (tests,
benchmarks), ``with kernels.use("blas"):``; the host library is built then, before anything is traced.

A kernel is declared once, by its XLA implementation, with ``@dispatch(host=...)`` naming the host one
(same signature and results, within 1e-5: tests/test_host_blas.py). ``host_path`` is the one place that
decides which runs, per call at trace time: the host one only on the CPU backend, for float32 operands,
outside any multi-device mesh (XLA would gather a custom call's operands onto every device), and only
where the library was built.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from podformer.core.errors import UserError
from podformer.model import host_blas

Array = jax.Array
ENV = "PODFORMER_CPU_MATMUL"
MODES = ("xla", "blas")


def _env_mode() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "xla"
    if value not in MODES:
        raise UserError(
            f"{ENV}={value!r}; set it to 'xla' (XLA's own ops, the default) or 'blas' (float32 CPU matmuls on "
            "numpy's OpenBLAS, model/host_blas.py), or unset it"
        )
    return value


# Read at import, which the entries do before parsing flags (so outside their one-line error handling):
# a bad value is raised by the first kernel traced, inside the run.
try:
    _mode, _bad_env = _env_mode(), None
except UserError as e:
    _mode, _bad_env = "xla", e
if _mode == "blas":
    host_blas.load()  # now, before any trace: a build must never run inside one


def mode() -> str:
    """The path chosen for code traced now: 'xla' or 'blas'."""
    return _mode


@contextlib.contextmanager
def use(chosen: str):
    """Trace the block with ``chosen`` ('xla' or 'blas'): tests and benchmarks compare the two paths in
    one process; podformer/aot.py pins 'xla' for programs compiled for a TPU on this host."""
    global _mode
    if chosen not in MODES:
        raise ValueError(f"kernels.use({chosen!r}): choose one of {MODES}")
    if chosen == "blas":
        host_blas.load()
    saved, _mode = _mode, chosen
    try:
        yield
    finally:
        _mode = saved


def host_path(*arrays: Array) -> bool:
    """Whether an op over these arrays, traced now, runs on the host BLAS."""
    if _bad_env is not None:
        raise _bad_env
    if _mode != "blas" or not host_blas.loaded():
        return False
    if any(a.dtype != jnp.float32 for a in arrays) or jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _floating(a) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape") and jnp.issubdtype(a.dtype, jnp.floating)


def dispatch(host: Callable, *, supports: Callable[..., bool] | None = None):
    """Declare a kernel: the decorated function is XLA's implementation, ``host`` the host-BLAS one.
    ``supports(*args, **kwargs)`` limits the host one to the cases it implements (attention without
    an additive bias); its floating-point array arguments are what ``host_path`` checks."""

    def declare(xla: Callable) -> Callable:
        @functools.wraps(xla)
        def kernel(*args, **kwargs):
            arrays = [a for a in (*args, *kwargs.values()) if _floating(a)]
            if host_path(*arrays) and (supports is None or supports(*args, **kwargs)):
                return host(*args, **kwargs)
            return xla(*args, **kwargs)

        kernel.xla, kernel.host = xla, host
        return kernel

    return declare


# The dense contraction and the output projection, shared by every layer of model/layers.py. Attention
# (model/attention.py) and the fused LM head (model/lm_head.py) declare their kernels where they live.


@dispatch(host=host_blas.contract)
def contract(x: Array, w: Array, n_in: int) -> Array:
    """``x``'s last ``n_in`` dims against ``w``'s first ``n_in`` (a Dense layer)."""
    contracting = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, w, (contracting, ((), ())))


@jax.custom_vjp
def _unembed_xla(x_BLD: Array, w_VD: Array) -> Array:
    return jnp.einsum("BLD,VD->BLV", x_BLD, w_VD)


def _unembed_xla_fwd(x_BLD, w_VD):
    return _unembed_xla(x_BLD, w_VD), (x_BLD, w_VD)


def _unembed_xla_bwd(res, g_BLV):
    # The weight gradient is formed as (x^T g)^T: both backward matmuls then read the vocabulary-sized
    # gradient in its natural row-major layout. Left to autodiff, XLA's CPU backend materialises it a
    # second time, transposed (a 2048x32000 float32 copy per step at the benchmark shape).
    x_BLD, w_VD = res
    dx = jnp.einsum("BLV,VD->BLD", g_BLV, w_VD)
    dw_DV = jnp.einsum("BLD,BLV->DV", x_BLD, g_BLV)
    return dx, dw_DV.T.astype(w_VD.dtype)


_unembed_xla.defvjp(_unembed_xla_fwd, _unembed_xla_bwd)


@jax.custom_vjp
def _unembed_host(x_BLD: Array, w_VD: Array) -> Array:
    B, L, D = x_BLD.shape
    return host_blas.matmul(x_BLD.reshape(B * L, D), w_VD, transpose_b=True).reshape(B, L, -1)


def _unembed_host_fwd(x_BLD, w_VD):
    return _unembed_host(x_BLD, w_VD), (x_BLD, w_VD)


def _unembed_host_bwd(res, g_BLV):
    x_BLD, w_VD = res
    B, L, D = x_BLD.shape
    g_MV, x_MD = g_BLV.reshape(B * L, -1), x_BLD.reshape(B * L, D)
    return host_blas.matmul(g_MV, w_VD).reshape(B, L, D), host_blas.matmul(g_MV, x_MD, transpose_a=True)


_unembed_host.defvjp(_unembed_host_fwd, _unembed_host_bwd)


@dispatch(host=_unembed_host)
def unembed(x_BLD: Array, w_VD: Array) -> Array:
    """Output projection onto a (V, D) embedding table: logits_BLV = x_BLD @ w_VD^T."""
    return _unembed_xla(x_BLD, w_VD)
