"""Hugging Face interop: read and write local transformers model folders, and the import/export command.

    python -m podformer.model.hf import HF_DIR WORKDIR     # a podformer parameters checkpoint (+ the tokenizer files)
    python -m podformer.model.hf export WORKDIR HF_DIR     # config.json + model.safetensors that transformers loads

``from_pretrained(path)`` reads config.json and model.safetensors, sharded safetensors with an index, or
pytorch_model.bin (sharded or not; loaded with ``torch.load(weights_only=True)``, which refuses pickled
objects other than tensors), detects the family from ``model_type`` and returns the podformer module,
sharded when called under a mesh and logical-axis rules. ``save_pretrained(module, path)`` writes the
reverse. The per-family tensor rules live in hf_decoders.py, hf_encoders.py and hf_seq2seq.py.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import struct
import sys

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

from podformer.core import sharding
from podformer.core.errors import UserError
from podformer.model import hf_decoders, hf_encoders, hf_seq2seq, params
from podformer.model.hf_common import Format, HFError, architecture

FORMATS: dict[str, Format] = {
    f.model_type: f for f in (*hf_decoders.FORMATS, *hf_encoders.FORMATS, *hf_seq2seq.FORMATS)
}
# Files that make up a tokenizer in a model folder (copied along by the import/export command).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


# ---------------------------------------------------------------------------------------------------
# Reading tensors

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


def read_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise HFError(f"{path}: no config.json; point at a Hugging Face model folder")
    with open(cfg_path) as f:
        return json.load(f)


def format_for(model_type: str | None, where: str = "") -> Format:
    if model_type not in FORMATS:
        supported = ", ".join(sorted(FORMATS))
        raise HFError(f"{where or 'model_type'}: model_type {model_type!r} is not supported; supported: {supported}")
    return FORMATS[model_type]


# ---------------------------------------------------------------------------------------------------
# Import


def convert(hf_cfg: dict, sd: dict[str, np.ndarray], where: str = "") -> tuple[Format, object, dict, list[str]]:
    """(format, family config, canonical params, optional params the checkpoint lacks) of a transformers
    config and state dict."""
    fmt = format_for(hf_cfg.get("model_type"), where)
    if fmt.prefix and not any(k.startswith(fmt.prefix) for k in sd):  # a bare base model (BertModel, ...)
        sd = {fmt.prefix + k: v for k, v in sd.items()}
    try:
        cfg = fmt.config_from_hf(hf_cfg, sd)
    except KeyError as e:
        raise HFError(f"{where}: config.json has no {e.args[0]!r}, which {fmt.model_type} needs") from None
    except HFError as e:
        raise HFError(f"{where}: {e}") from None
    flat, used, absent = {}, set(), []
    for rule in fmt.rules(cfg):
        if rule.hf not in sd:
            absent.extend(rule.ours)
            continue
        flat.update(zip(rule.ours, rule.to_ours(sd[rule.hf]), strict=True))
        used.add(rule.hf)
    unused = sorted(k for k in sd if k not in used and not any(re.search(p, k) for p in fmt.ignore))
    if unused:
        raise HFError(f"{where}: tensors podformer's {fmt.model_type} model has no place for: {unused[:4]}")
    required = [n for n in absent if n not in fmt.optional]
    if required:
        raise HFError(f"{where}: the checkpoint lacks {len(required)} tensors, e.g. for {required[:3]}")
    return fmt, cfg, flat, absent


def load(path: str) -> tuple[str, object, dict[str, np.ndarray], list[str]]:
    """(family, config, canonical params, missing optional params) of a Hugging Face folder."""
    hf_cfg = read_config(path)
    format_for(hf_cfg.get("model_type"), path)  # an unsupported family fails before any tensor is read
    fmt, cfg, flat, missing = convert(hf_cfg, read_state_dict(path), path)
    return fmt.family, cfg, flat, missing


def build(family: str, cfg, flat: dict[str, np.ndarray], *, seed: int = 0, mesh=None, rules=None) -> nnx.Module:
    """The family module holding ``flat``; placed by the logical rules when a mesh is given or active.
    Parameters absent from ``flat`` keep their random initialisation."""
    from podformer import model as models

    module_cls = models.FAMILIES[family][1]
    mesh = mesh if mesh is not None else jax.sharding.get_mesh()
    rules = rules if rules is not None else flax_spmd.get_logical_axis_rules()
    sharded = mesh is not None and not getattr(mesh, "empty", False) and rules
    model = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(seed)))
    shardings = sharding.state_shardings(nnx.state(model, params.SAVED), mesh, rules) if sharded else None
    names = set(params.param_shapes(model))
    if set(flat) - names:
        raise HFError(f"values for parameters a {family} model does not have: {sorted(set(flat) - names)[:4]}")
    if names - set(flat):  # some parameters are missing: start from a real initialisation instead
        model = module_cls(cfg, rngs=nnx.Rngs(seed))
        params.set_params(model, flat, allow_missing=True)
        if sharded:
            nnx.update(model, jax.device_put(nnx.state(model, params.SAVED), shardings))
        return model
    params.set_params(model, flat, shardings=shardings)
    return model


def from_pretrained(path: str, *, seed: int = 0, mesh=None, rules=None, **overrides) -> nnx.Module:
    """The podformer module with the weights of the local Hugging Face folder ``path``. ``overrides``
    change how the model runs (scan_layers, dtype, remat, dropout, attention_impl), not what it computes."""
    family, cfg, flat, missing = load(path)
    bad = sorted(set(overrides) - set(params.TRAINING_FIELDS))
    if bad:
        raise HFError(f"from_pretrained: {bad[0]} is fixed by the checkpoint; overridable: {params.TRAINING_FIELDS}")
    if missing:
        print(f"podformer: {path} has no {', '.join(missing)}: initialised at random", file=sys.stderr)
    return build(family, dataclasses.replace(cfg, **overrides), flat, seed=seed, mesh=mesh, rules=rules)


def load_params(path: str) -> tuple[str, object, dict[str, np.ndarray]]:
    """(family, config, canonical params) from a podformer workdir or a Hugging Face folder."""
    if params.is_workdir(path):
        family, cfg, flat, _ = params.read_workdir(path)
        return family, cfg, flat
    if os.path.exists(os.path.join(path, "config.json")):
        family, cfg, flat, _ = load(path)
        return family, cfg, flat
    raise HFError(f"{path}: neither a podformer workdir (checkpoints/) nor a Hugging Face folder (config.json)")


# ---------------------------------------------------------------------------------------------------
# Export


def _family_of(cfg) -> str:
    from podformer import model as models

    for family, (config_cls, _) in models.FAMILIES.items():
        if type(cfg) is config_cls:
            return family
    raise HFError(f"{type(cfg).__name__} is not a podformer family config")


def select_format(cfg, model_type: str | None = None) -> tuple[Format, dict]:
    """(format, config.json dict) for a family config. Without ``model_type`` the first transformers
    architecture that represents the config exactly is chosen: its config.json must read back to the
    same function, so a model transformers cannot express is never exported as something else."""
    family = _family_of(cfg)
    candidates = [format_for(model_type)] if model_type else [f for f in FORMATS.values() if f.family == family]
    reasons = []
    for fmt in candidates:
        try:
            hf_cfg = fmt.config_to_hf(cfg)
            # Which tensors exist is part of the architecture (a pooler, an untied head): stand-ins say so.
            names = {r.hf: np.empty(0, np.float32) for r in fmt.rules(cfg)}
            diff = params.arch_diff(fmt.config_from_hf(hf_cfg, names), cfg)
        except (HFError, KeyError, ValueError) as e:
            reasons.append(f"{fmt.model_type}: {e}")
            continue
        if not diff:
            return fmt, {**hf_cfg, "model_type": fmt.model_type, "architectures": [architecture(fmt, cfg)]}
        reasons.append(f"{fmt.model_type}: {diff[0]}")
    raise HFError(f"no transformers architecture represents this {family} model ({'; '.join(reasons)[:600]})")


def to_hf(cfg, flat: dict[str, np.ndarray], model_type: str | None = None) -> tuple[Format, dict, dict]:
    """(format, config.json dict, state dict) for a family config and its canonical parameters."""
    fmt, hf_cfg = select_format(cfg, model_type)
    sd = {r.hf: np.ascontiguousarray(r.to_hf(*[flat[n] for n in r.ours])) for r in fmt.rules(cfg)}
    return fmt, hf_cfg, sd


def hf_config(cfg, model_type: str | None = None) -> dict:
    """The config.json transformers needs for ``cfg`` (no parameters involved: e.g. to count them)."""
    return select_format(cfg, model_type)[1]


def save_pretrained(
    module: nnx.Module,
    path: str,
    *,
    model_type: str | None = None,
    base_config: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Write config.json and model.safetensors (or shards of at most ``max_shard_bytes`` plus an index)
    that transformers loads with the matching AutoModel class. ``base_config`` (e.g. the imported
    folder's config.json) supplies what podformer does not model: token ids, generation settings."""
    from safetensors.numpy import save_file

    base_config = dict(base_config or {})
    model_type = model_type or (base_config.get("model_type") if base_config.get("model_type") in FORMATS else None)
    select_format(module.cfg, model_type)  # fails before any parameter is fetched from the devices
    fmt, arch_cfg, sd = to_hf(module.cfg, params.get_params(module), model_type)
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "model*.safetensors*")) + glob.glob(os.path.join(path, "pytorch_model*")):
        os.remove(stale)
    config = {**base_config, **arch_cfg}
    config["dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(sd):
        if shards[-1] and size + sd[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = sd[name]
        size += sd[name].nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(a.nbytes for a in sd.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return path


# ---------------------------------------------------------------------------------------------------
# Command line


def import_folder(hf_dir: str, workdir: str, *, scan_layers: bool = True) -> str:
    """A Hugging Face folder -> a parameters-only podformer checkpoint in ``workdir`` (+ its tokenizer)."""
    if params.is_workdir(workdir):
        raise HFError(f"{workdir} already has checkpoints; import into a new directory")
    family, cfg, flat, missing = load(hf_dir)
    model = build(family, dataclasses.replace(cfg, scan_layers=scan_layers), flat)
    meta = {"source": os.path.abspath(hf_dir), "hf_config": read_config(hf_dir), "missing": missing}
    params.save_workdir(workdir, model, family, meta)
    copied = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(hf_dir, n))]
    if copied:
        os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
        for name in copied:
            shutil.copy(os.path.join(hf_dir, name), os.path.join(workdir, "tokenizer", name))
    return family


def export_workdir(workdir: str, hf_dir: str, *, model_type: str | None = None, step: int | None = None) -> str:
    """A podformer workdir's latest (or ``step``) parameters -> a Hugging Face folder (+ its tokenizer)."""
    try:
        family, cfg, flat, meta = params.read_workdir(workdir, step)
    except FileNotFoundError as e:
        raise HFError(str(e)) from None
    model = build(family, cfg, flat)
    save_pretrained(model, hf_dir, model_type=model_type, base_config=meta.get("hf_config"))
    tok_dir = os.path.join(workdir, "tokenizer")
    for name in os.listdir(tok_dir) if os.path.isdir(tok_dir) else []:
        shutil.copy(os.path.join(tok_dir, name), os.path.join(hf_dir, name))
    return family


USAGE = """usage:
  python -m podformer.model.hf import HF_DIR WORKDIR [--scan_layers=false]
  python -m podformer.model.hf export WORKDIR HF_DIR [--model_type=NAME] [--step=N]"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = {a[2:].partition("=")[0]: a.partition("=")[2] for a in argv if a.startswith("--")}
    args = [a for a in argv if not a.startswith("--")]
    try:
        if len(args) != 3 or args[0] not in ("import", "export"):
            raise UserError(f"expected import|export and two paths\n{USAGE}")
        allowed = {"import": {"scan_layers"}, "export": {"model_type", "step"}}[args[0]]
        if set(flags) - allowed:
            raise UserError(f"unknown flag --{sorted(set(flags) - allowed)[0]}\n{USAGE}")
        if args[0] == "import":
            family = import_folder(args[1], args[2], scan_layers=flags.get("scan_layers", "true").lower() != "false")
            print(f"imported {args[1]} ({family}) -> {args[2]}; train from it with --config.init.checkpoint={args[2]}")
        else:
            step = int(flags["step"]) if flags.get("step") else None
            family = export_workdir(args[1], args[2], model_type=flags.get("model_type"), step=step)
            print(f"exported {args[1]} ({family}) -> {args[2]}")
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
