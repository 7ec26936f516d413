"""Accelerator chips (peak FLOP/s, HBM, HBM bandwidth, with sources) and the roofline over them."""

from __future__ import annotations

import dataclasses
import re

from podformer.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 (fp16 on V100) matrix FLOP/s per chip
    hbm_gib: float  # memory per chip
    hbm_bytes_per_s: float
    source: str
    tpu: bool = False


# One JAX device per chip everywhere (v4 and v5p run their two TensorCores as one megacore device).
# TPU figures: Google Cloud's system-architecture pages, cloud.google.com/tpu/docs/<version> (v2/v3: the
# "TPU versions" table); NVIDIA's: the product datasheets (SXM parts, dense, without sparsity).
CHIPS = {
    "v2": Chip("TPU v2", 45e12, 16, 600e9, "cloud.google.com/tpu/docs/v2", tpu=True),
    "v3": Chip("TPU v3", 123e12, 32, 900e9, "cloud.google.com/tpu/docs/v3", tpu=True),
    "v4": Chip("TPU v4", 275e12, 32, 1228e9, "cloud.google.com/tpu/docs/v4", tpu=True),
    "v5e": Chip("TPU v5e", 197e12, 16, 819e9, "cloud.google.com/tpu/docs/v5e", tpu=True),
    "v5p": Chip("TPU v5p", 459e12, 95, 2765e9, "cloud.google.com/tpu/docs/v5p", tpu=True),
    "v6e": Chip("TPU v6e", 918e12, 32, 1640e9, "cloud.google.com/tpu/docs/v6e", tpu=True),
    "v100": Chip("V100 SXM2 32GB", 125e12, 32 * 1e9 / 2**30, 900e9, "NVIDIA V100 datasheet (tensor cores, fp16)"),
    "a100": Chip("A100 SXM 80GB", 312e12, 80 * 1e9 / 2**30, 2039e9, "NVIDIA A100 datasheet"),
    "h100": Chip("H100 SXM", 989e12, 80 * 1e9 / 2**30, 3350e9, "NVIDIA H100 datasheet"),
    "h200": Chip("H200 SXM", 989e12, 141 * 1e9 / 2**30, 4800e9, "NVIDIA H200 datasheet"),
}
CHIPS["v5litepod"] = CHIPS["v5e"]

# jax's device_kind -> chip: the longest matching key wins ("tpu v5 lite" before "tpu v5").
DEVICE_KINDS = {
    "tpu v2": "v2",
    "tpu v3": "v3",
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5p": "v5p",
    "tpu v5": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
    "v100": "v100",
    "a100": "a100",
    "h100": "h100",
    "h200": "h200",
}


def chip_of(device_kind: str) -> Chip | None:
    kind = device_kind.lower()
    for key in sorted(DEVICE_KINDS, key=len, reverse=True):
        if key in kind:
            return CHIPS[DEVICE_KINDS[key]]
    return None


@dataclasses.dataclass(frozen=True)
class Hardware:
    chip: Chip
    chips: int  # in all slices
    slices: int = 1
    spec: str = ""


def parse_hardware(spec: str) -> Hardware:
    """``v5p-1024`` (TensorCores for v2-v5p, chips for v5e/v6e, as Cloud TPU names slices), ``v4-6144x2``
    (two such slices), ``h100x512`` (GPUs)."""
    s = spec.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)(?:x(\d+))?", s)
    if m and m.group(1) in CHIPS:
        cores_in_name = m.group(1) in ("v2", "v3", "v4", "v5p")
        n, slices = int(m.group(2)), int(m.group(3) or 1)
        chips = n // 2 if cores_in_name else n
        if chips < 1 or (cores_in_name and n % 2):
            raise UserError(f"--hardware={spec}: {m.group(1)}-N counts TensorCores, two per chip; N must be even")
        return Hardware(CHIPS[m.group(1)], chips * slices, slices, spec)
    m = re.fullmatch(r"([a-z]\d+)x(\d+)", s)
    if m and m.group(1) in CHIPS and not CHIPS[m.group(1)].tpu and int(m.group(2)) > 0:
        return Hardware(CHIPS[m.group(1)], int(m.group(2)), 1, spec)
    tpus = ", ".join(k for k, c in CHIPS.items() if c.tpu)
    gpus = ", ".join(k for k, c in CHIPS.items() if not c.tpu)
    raise UserError(
        f"--hardware={spec}: expected a TPU slice VERSION-N[xSLICES] (VERSION one of {tpus}; e.g. v5p-1024, "
        f"v4-6144x2) or GPUxCOUNT (GPU one of {gpus}; e.g. h100x512)"
    )


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict:
    """Lower bound on one device's step time: the larger of compute at peak and HBM traffic at full
    bandwidth (communication and overlap not modelled), and the MFU that bound allows."""
    compute_s, memory_s = flops / chip.peak_flops, bytes_accessed / chip.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    return {
        "compute_s": compute_s,
        "memory_s": memory_s,
        "step_s": step_s,
        "bound": "compute" if compute_s >= memory_s else "memory (HBM bandwidth)",
        "intensity": flops / bytes_accessed if bytes_accessed else float("inf"),
    }


def mfu_bound(model_flops: float, step_s: float, chip: Chip) -> float:
    """The MFU a step of ``step_s`` seconds gives for ``model_flops`` per device."""
    return model_flops / (chip.peak_flops * step_s) if step_s > 0 else 0.0
