"""Layout-independent parameter names: one flat dict per model whatever its layer layout.

Scanned stacks keep one array with a leading layer axis (``blocks.layers.attn.query.kernel``);
unrolled stacks keep a list (``blocks.layers.3.attn.query.kernel``). Both read and write the same
canonical names, ``blocks.3.attn.query.kernel``, so Hugging Face conversion and checkpoint layout
changes never depend on how the layers were stacked.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from model import layers


def _stacks(model: nnx.Module) -> dict[tuple, layers.BlockStack]:
    return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, layers.BlockStack)}


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def get_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Canonical flat name -> numpy array (float32) for every nnx.Param of ``model``."""
    stacks = _stacks(model)
    out: dict[str, np.ndarray] = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        stack_path = next((sp for sp in stacks if path[: len(sp)] == sp), None)
        if stack_path is None:
            out[_key(path)] = arr
            continue
        stack = stacks[stack_path]
        rest = path[len(stack_path) + 1 :]  # drop the 'layers' attribute
        prefix = _key(stack_path)
        if stack.scan:
            for i in range(stack.num_layers):
                out[f"{prefix}.{i}.{_key(rest)}"] = arr[i]
        else:
            out[f"{prefix}.{rest[0]}.{_key(rest[1:])}"] = arr
    return out


def set_params(model: nnx.Module, flat: dict[str, np.ndarray], *, strict: bool = True) -> None:
    """Write canonical-named arrays into ``model`` in place (shapes and names checked)."""
    stacks = _stacks(model)
    state = nnx.state(model, nnx.Param)
    seen: set[str] = set()
    new_flat = []
    for path, var in nnx.to_flat_state(state):
        stack_path = next((sp for sp in stacks if path[: len(sp)] == sp), None)
        if stack_path is not None and stacks[stack_path].scan:
            rest = _key(path[len(stack_path) + 1 :])
            names = [f"{_key(stack_path)}.{i}.{rest}" for i in range(stacks[stack_path].num_layers)]
            missing = [n for n in names if n not in flat]
            if missing:
                raise KeyError(f"no value for parameter {missing[0]}")
            value = np.stack([np.asarray(flat[n]) for n in names])
        else:
            name = _key(path) if stack_path is None else _key(stack_path + path[len(stack_path) + 1 :])
            names = [name]
            if name not in flat:
                raise KeyError(f"no value for parameter {name}")
            value = np.asarray(flat[name])
        if value.shape != var.shape:
            raise ValueError(f"parameter {names[0]}: expected shape {var.shape}, got {value.shape[-len(var.shape) :]}")
        seen.update(names)
        new_flat.append((path, var.replace(value.astype(var.dtype))))
    extra = sorted(set(flat) - seen)
    if strict and extra:
        raise KeyError(f"values given for parameters the model does not have: {extra[:5]}")
    nnx.update(model, nnx.from_flat_state(new_flat))
