"""Hugging Face interop: read and write local transformers model folders, and the import/export command.

    python -m podformer.model.hf import HF_DIR WORKDIR  # a parameters checkpoint (+ tokenizer, sentence-transformers)
    python -m podformer.model.hf export WORKDIR HF_DIR  # for transformers: the heads that exist, the tokenizer

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
import sys

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd

from podformer.core import sharding
from podformer.core.errors import UserError
from podformer.data import hf_tokenizer
from podformer.model import families, hf_decoders, hf_encoders, hf_seq2seq, params
from podformer.model.hf_common import Format, HFError, architecture
from podformer.model.hf_tensors import read_safetensors, read_state_dict, read_torch_bin  # noqa: F401 (API)

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
    if fmt.pack is not None:
        sd = fmt.pack(sd)
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
    return families.of_format(fmt.model_type).name, cfg, flat, missing


def build(family: str, cfg, flat: dict[str, np.ndarray], *, seed: int = 0, mesh=None, rules=None) -> nnx.Module:
    """The family module holding ``flat``; placed by the logical rules when a mesh is given or active.
    Parameters absent from ``flat`` keep their random initialisation."""
    module_cls = families.get(family).module_class()
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


def select_format(cfg, model_type: str | None = None) -> tuple[Format, dict]:
    """(format, config.json dict) for a family config. Without ``model_type`` the first transformers
    architecture that represents the config exactly is chosen: its config.json must read back to the
    same function, so a model transformers cannot express is never exported as something else."""
    candidates = [format_for(model_type)] if model_type else [FORMATS[t] for t in families.of(cfg).hf_formats]
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
    raise HFError(
        f"no transformers architecture represents this {families.of(cfg).name} model ({'; '.join(reasons)[:600]})"
    )


def to_hf(
    cfg, flat: dict[str, np.ndarray], model_type: str | None = None, *, base_model: bool = False
) -> tuple[Format, dict, dict]:
    """(format, config.json dict, state dict) for a family config and the canonical parameters that exist
    (imported or trained). A model whose head does not exist (an imported BertModel, an MLM head nobody
    trained), or ``base_model``, is written as transformers' base architecture (BertModel, GPT2Model,
    T5Model, ...); otherwise as the architecture of the heads that exist. A tensor is never invented."""
    fmt, hf_cfg = select_format(cfg, model_type)
    rules = fmt.rules(cfg)
    base_cls, prefix = fmt.base_model
    head = [r for r in rules if _in_head(r.hf, prefix)]
    have = [r for r in rules if all(n in flat for n in r.ours)]
    if base_model or (head and not any(r in have for r in head)):
        rules, arch = [r for r in rules if r not in head], base_cls
        names = {r.hf: r.hf.removeprefix(prefix) for r in rules}
    else:
        # The architecture of what exists: config_from_hf reads the heads (BERT's NSP head) off the names.
        written = fmt.config_from_hf(hf_cfg, {r.hf: np.empty(0, np.float32) for r in have})
        rules, arch = fmt.rules(written), architecture(fmt, written)
        names = {r.hf: r.hf for r in rules}
    absent = sorted({n for r in rules for n in r.ours if n not in flat})
    if absent:
        raise HFError(
            f"{arch} needs parameters that were never imported nor trained: {', '.join(absent[:4])}; train them "
            "(an objective that uses them) or export from a checkpoint that has them"
        )
    sd = {names[r.hf]: np.ascontiguousarray(r.to_hf(*[flat[n] for n in r.ours])) for r in rules}
    if fmt.unpack is not None:
        sd = {k: np.ascontiguousarray(v) for k, v in fmt.unpack(sd).items()}
    return fmt, {**hf_cfg, "architectures": [arch]}, sd


def _in_head(name: str, prefix: str) -> bool:
    # The base model's tensors sit under its prefix (bert., transformer., model.); T5's base has none, and
    # no base model has an lm_head.
    return not name.startswith(prefix) or name.startswith("lm_head.")


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
    base_config = dict(base_config or {})
    model_type = model_type or (base_config.get("model_type") if base_config.get("model_type") in FORMATS else None)
    select_format(module.cfg, model_type)  # fails before any parameter is fetched from the devices
    return write_folder(path, module.cfg, params.get_params(module), model_type=model_type, base_config=base_config,
                        max_shard_bytes=max_shard_bytes)  # fmt: skip


def write_folder(
    path: str,
    cfg,
    flat: dict[str, np.ndarray],
    *,
    model_type: str | None = None,
    base_config: dict | None = None,
    base_model: bool = False,
    token_ids: dict[str, int] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """save_pretrained for canonical parameters (to_hf: only those that exist are written). ``token_ids``
    (the tokenizer's pad/bos/eos ids) fill in config.json where ``base_config`` has none, instead of
    transformers' defaults (GPT-2's 50256); a generative architecture gets them in generation_config.json."""
    from safetensors.numpy import save_file

    base_config = dict(base_config or {})
    model_type = model_type or (base_config.get("model_type") if base_config.get("model_type") in FORMATS else None)
    fmt, arch_cfg, sd = to_hf(cfg, flat, model_type, base_model=base_model)
    os.makedirs(path, exist_ok=True)
    stale = ("model*.safetensors*", "pytorch_model*", "generation_config.json")
    for name in [f for pattern in stale for f in glob.glob(os.path.join(path, pattern))]:
        os.remove(name)
    config = {**base_config, **arch_cfg}
    for key, value in (token_ids or {}).items():  # the imported config's own ids stay (they match its tokenizer)
        config.setdefault(key, value)
    config["dtype"] = "float32"
    row = families.of_format(fmt.model_type)
    start = f"{row.framing.decoder_start}_token_id"  # an encoder-decoder's decoder starts from pad (T5) or eos
    if row.kind == "seq2seq" and start in config:
        config.setdefault("decoder_start_token_id", config[start])
    _write_json(os.path.join(path, "config.json"), config)
    if arch_cfg["architectures"][0].endswith(("LMHeadModel", "ForCausalLM", "ForConditionalGeneration")):
        keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
        _write_json(os.path.join(path, "generation_config.json"), {k: config[k] for k in keys if k in config})
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
    _write_json(os.path.join(path, "model.safetensors.index.json"), {"metadata": {"total_size": total},
                                                                      "weight_map": weight_map})  # fmt: skip
    return path


# The decoder of an encoder-decoder starts from pad (T5) or eos (BART), as podformer's own generation does.
def _write_json(path: str, content: dict) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# Command line


def import_folder(hf_dir: str, workdir: str, *, scan_layers: bool = True) -> str:
    """A Hugging Face folder -> a parameters-only podformer checkpoint in ``workdir``, with the folder's
    tokenizer (``tokenizer/``) and the files other libraries read beside the model (``hf_files/``:
    sentence-transformers' modules and pooling, generation_config.json), which export writes back."""
    if params.is_workdir(workdir):
        raise HFError(f"{workdir} already has checkpoints; import into a new directory")
    family, cfg, flat, missing = load(hf_dir)
    hf_cfg = read_config(hf_dir)
    model = build(family, dataclasses.replace(cfg, scan_layers=scan_layers), flat)
    base_cls = FORMATS[hf_cfg["model_type"]].base_model[0]
    meta = {
        "source": os.path.abspath(hf_dir),
        "hf_config": hf_cfg,
        "missing": missing,
        "untrained": missing,  # params.read_workdir leaves them out: initialised here, never imported
        "base_model": (hf_cfg.get("architectures") or [""])[0] == base_cls,
    }
    params.save_workdir(workdir, model, family, meta)
    for names, dest in ((TOKENIZER_FILES, "tokenizer"), (_extra_files(hf_dir), "hf_files")):
        for name in names:
            if os.path.exists(os.path.join(hf_dir, name)):
                _copy(os.path.join(hf_dir, name), os.path.join(workdir, dest, name))
    return family


# What a sentence-transformers folder holds beside the transformers model and tokenizer (and the modules'
# own folders that modules.json names: 1_Pooling/, 2_Dense/, ...).
EXTRA_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "generation_config.json",
)


def _extra_files(hf_dir: str) -> list[str]:
    names = list(EXTRA_FILES)
    if os.path.isfile(os.path.join(hf_dir, "modules.json")):
        with open(os.path.join(hf_dir, "modules.json")) as f:
            names += [m["path"] for m in json.load(f) if m.get("path")]
    return names


def _copy(src: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.isdir(src):
        shutil.copytree(src, dest, dirs_exist_ok=True)
    else:
        shutil.copy(src, dest)


def export_workdir(workdir: str, hf_dir: str, *, model_type: str | None = None, step: int | None = None) -> str:
    """A podformer workdir's latest (or ``step``) parameters that exist (imported or trained; see to_hf) ->
    a Hugging Face folder, with the tokenizer the model was trained with and the imported folder's extra
    files (sentence-transformers')."""
    try:
        family, cfg, flat, meta = params.read_workdir(workdir, step)
    except FileNotFoundError as e:
        raise HFError(str(e)) from None
    base_config = dict(meta.get("hf_config") or {})
    model_type = model_type or (base_config.get("model_type") if base_config.get("model_type") in FORMATS else None)
    fmt, _ = select_format(cfg, model_type)  # a model transformers cannot express fails before any file is written
    tok_dir, token_ids = os.path.join(workdir, "tokenizer"), {}
    if os.path.isdir(tok_dir):
        length = getattr(cfg, "max_len", 0) or 512
        # Framed as podformer's objectives frame a text (a decoder's documents start with bos; BERT's
        # [CLS] text [SEP]; T5's text </s>) when transformers' tokenizer adds special tokens.
        framing = families.of_format(fmt.model_type).framing
        frame = (framing.start, framing.sep)
        token_ids = hf_tokenizer.export(tok_dir, hf_dir, frame=frame, model_max_length=length)
    elif meta.get("params_only"):  # imported from a folder without one: there is none to carry
        print(f"podformer: {meta.get('source', workdir)} had no tokenizer; {hf_dir} has none either", file=sys.stderr)
    else:
        raise HFError(
            f"{workdir} has no tokenizer/ (the tokenizer the model was trained with); copy its files there "
            "(its tokenizer.json, or the SentencePiece .model as tokenizer.model) and export again"
        )
    write_folder(hf_dir, cfg, flat, model_type=fmt.model_type, base_config=base_config,
                 base_model=bool(meta.get("base_model")), token_ids=token_ids)  # fmt: skip
    extra = os.path.join(workdir, "hf_files")  # the imported folder's own: they win over what podformer writes
    for name in sorted(os.listdir(extra)) if os.path.isdir(extra) else []:
        _copy(os.path.join(extra, name), os.path.join(hf_dir, name))
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
