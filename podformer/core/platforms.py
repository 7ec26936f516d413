"""Which JAX platforms a process tries: never the TPU on a host that has none (libtpu's start-up noise).

With libtpu installed (the ``aot`` extra, for ``--compile_only``), JAX tries the TPU backend first in every
process; on a host without TPU chips libtpu then prints several lines of errors (``INVALID_ARGUMENT:
unexpected worker hostname``, ...) before JAX falls back to the CPU. Leaving the TPU out of
``JAX_PLATFORMS`` there skips that attempt. ``--compile_only`` still reaches the TPU compiler: it loads
libtpu itself for a topology description (podformer/aot.py), whatever the platforms.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Set on TPU VMs and GKE TPU pods (or by hand) to tell libtpu or JAX that the host has TPUs.
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")
GOOGLE_PCI_VENDOR = "0x1ae0"  # every Cloud TPU chip's PCI vendor id (what JAX's own detection reads)
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda12")


def tpu_host(root: str = "/", environ: dict | None = None) -> bool:
    """Whether this host may have TPUs: any sign is enough (a false yes only costs the noise; a false no
    would hide real TPUs). TPU VMs expose their chips as /dev/accel* (v2-v4, v5p) or /dev/vfio/<n> (v5e,
    v6e) and on the PCI bus with Google's vendor id."""
    environ = os.environ if environ is None else environ
    if any(environ.get(k) for k in TPU_ENV):
        return True
    if glob.glob(os.path.join(root, "dev/accel*")) or glob.glob(os.path.join(root, "dev/vfio/[0-9]*")):
        return True
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def nvidia_gpu(root: str = "/") -> bool:
    """An NVIDIA GPU and a CUDA plugin for JAX (naming the platform without its plugin would be an error)."""
    devices = glob.glob(os.path.join(root, "dev/nvidia[0-9]*")) or os.path.exists(os.path.join(root, "dev/dxg"))
    return bool(devices) and any(_installed(p) for p in CUDA_PLUGINS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or a half-installed one
        return False


def choice(root: str = "/", environ: dict | None = None) -> str | None:
    """The value for ``JAX_PLATFORMS``, or None to leave JAX's own choice alone: an explicit setting always
    wins, a host that may have TPUs keeps them, and without libtpu JAX never tries a TPU anyway."""
    environ = os.environ if environ is None else environ
    if "JAX_PLATFORMS" in environ or tpu_host(root, environ) or not _installed("libtpu"):
        return None
    return "cuda,cpu" if nvidia_gpu(root) else "cpu"


def choose() -> str | None:
    """Apply ``choice()`` before JAX starts a backend (the environment variable before ``import jax``, its
    config flag after); returns what was set."""
    value = choice()
    if value is None:
        return None
    os.environ["JAX_PLATFORMS"] = value  # subprocesses (data workers) choose the same
    jax = sys.modules.get("jax")
    if jax is not None:  # imported already: the flag still applies until the first backend starts
        jax.config.update("jax_platforms", value)
    return value
