"""Reading the tensors of a transformers model folder: safetensors (parsed here, bfloat16 included), sharded
or not, and pytorch_model.bin files (tensors only, never other pickled objects)."""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from podformer.model.hf_common import HFError

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _as_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16 else a


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file as numpy arrays (float ones as float32). Parsed here rather than through
    safetensors.numpy, which cannot represent bfloat16, the dtype most checkpoints are published in."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if os.path.getsize(path) > 8 + n else None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise HFError(f"{path}: tensor {name} has dtype {info['dtype']}, which podformer does not read")
        start, end = info["data_offsets"]
        raw = data[start:end] if end > start else np.zeros(0, np.uint8)
        out[name] = _as_float32(raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"]))
    return out


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A pytorch_model.bin, loaded with ``weights_only=True``: anything but tensors is refused, never
    unpickled (a pickle can run arbitrary code)."""
    try:
        import torch
    except ImportError:
        raise HFError(
            f"{path}: reading pytorch_model.bin needs PyTorch (pip install torch==2.13.0); or convert it to safetensors"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError) naming the forbidden global
        reason = str(e).strip().splitlines()
        reason = next((ln for ln in reason if "GLOBAL" in ln or "Unsupported" in ln), reason[0] if reason else "")
        raise HFError(
            f"{path} holds pickled objects other than tensors, which podformer refuses to load (torch.load with "
            f"weights_only=True: {reason.strip()[:200]}); convert the checkpoint to safetensors from a trusted source"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HFError(f"{path} is not a state dict of tensors; podformer reads only tensors from .bin files")
    return {k: _as_float32(v.float().numpy() if v.is_floating_point() else v.numpy()) for k, v in sd.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a model folder, whichever of the four layouts transformers writes it uses."""
    for single, index, reader in (
        ("model.safetensors", "model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", read_torch_bin),
    ):
        if os.path.exists(os.path.join(path, single)):
            return reader(os.path.join(path, single))
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, np.ndarray] = {}
            for name in files:
                sd.update(reader(os.path.join(path, name)))
            return sd
    raise HFError(
        f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
    )
