"""Config loading: ``--config=configs/gpt.py:tiny --config.opt.lr=3e-4 --workdir=...``.

Configs are ml_collections ConfigDicts built by ``get_config(arg)`` in a Python file. Overrides are
parsed against the type of the value they replace, and a key that does not exist is an error (with
the closest existing key suggested), so a typo never silently becomes a no-op.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import os
from typing import Any

import ml_collections

from podformer.core.errors import UserError
from podformer.model import families

# The configs' folder: the checkout's configs/ or the installed podformer/configs/ (the same files). Found,
# not imported: the library never imports the configs (they sit above it).
CONFIGS = os.path.abspath(importlib.util.find_spec("podformer.configs").submodule_search_locations[0])

# Sections and keys that every run config has; other code and scripts rely on these names.
REQUIRED = {
    "train": ("steps", "batch_size", "seq_len", "log_every", "eval_every", "seed"),
    "checkpoint": ("every", "keep"),
    "mesh": ("data", "fsdp", "tensor"),
    "model": ("family",),
    "data": (),
    "opt": (),
}


def find_config_file(path: str) -> str:
    """A config file by path (``configs/gpt.py``, ``./my.py``), or by its name among podformer's own configs
    from anywhere (``configs/gpt.py``, ``gpt.py``, ``gpt``, ``finetune/glue``), installed or in a checkout."""
    if os.path.isfile(path):
        return path
    name = path.removeprefix("configs/").removeprefix("configs" + os.sep)
    packaged = os.path.join(CONFIGS, name if name.endswith(".py") else name + ".py")
    if os.path.isfile(packaged):
        return packaged
    raise UserError(
        f"config file {path!r} does not exist; pass --config=configs/<family>.py[:variant] (podformer's own: "
        f"{', '.join(sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith('.py') and not f.startswith('_')))})"
    )


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path.py`` or ``path.py:arg`` -> the ConfigDict its ``get_config`` returns."""
    path, _, arg = spec.partition(":")
    path = find_config_file(path)
    module_spec = importlib.util.spec_from_file_location(f"_podformer_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config(arg) function")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except KeyError as e:
        raise UserError(f"config {path}: unknown variant {arg!r}; {e.args[0] if e.args else ''}") from None
    absolute = os.path.abspath(path)
    shown = "configs/" + os.path.relpath(absolute, CONFIGS) if absolute.startswith(CONFIGS + os.sep) else path
    cfg.config_spec = shown + (":" + arg if arg else "")
    return cfg


def _parse_value(key: str, text: str, current: Any) -> Any:
    def fail(kind: str):
        raise UserError(f"--config.{key}={text}: expected {kind} (the current value is {current!r})")

    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        fail("true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            fail("an integer")
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            fail("a number")
    if isinstance(current, str):
        return text
    if current is None or isinstance(current, tuple | list | dict):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if current is None:
                return text
            fail(f"a Python literal of type {type(current).__name__}")
        if current is not None and not isinstance(value, type(current)):
            fail(f"a {type(current).__name__}")
        return tuple(value) if isinstance(current, tuple) else value
    fail(type(current).__name__)


def apply_override(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
            where = ".".join(parts[:i]) or "the config"
            hint = difflib.get_close_matches(part, keys, n=1)
            suggestion = (
                f"; did you mean {'.'.join(parts[:i] + [hint[0]])}?"
                if hint
                else f"; {where} has: {', '.join(sorted(keys))}"
            )
            raise UserError(f"--config.{key}: unknown config key {part!r} in {where}{suggestion}")
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(
            f"--config.{key} is a section; set one of its keys, e.g. --config.{key}.{next(iter(current.keys()))}=..."
        )
    with node.unlocked():
        node[parts[-1]] = _parse_value(key, text, current)


def validate(cfg: ml_collections.ConfigDict) -> None:
    for section, keys in REQUIRED.items():
        if section not in cfg:
            raise UserError(f"config has no {section!r} section; start from configs/common.py:base()")
        for key in keys:
            if key not in cfg[section]:
                raise UserError(f"config has no {section}.{key}; start from configs/common.py:base()")
    validate_counts(cfg)
    t = cfg.train
    if t.batch_size % t.grad_accum:
        raise UserError(f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    family_config(cfg.model, families.get(cfg.model.family).config)  # bad model values fail here, before JAX
    group = cfg.model.get("moe_group_size", 0) if cfg.model.get("num_experts", 0) else 0
    tokens = t.batch_size // t.grad_accum * t.seq_len
    if group > 0 and tokens % group:
        raise UserError(
            f"model.moe_group_size={group} does not divide a micro-batch's {t.batch_size // t.grad_accum} x "
            f"{t.seq_len} = {tokens} tokens; pick a divisor, or -1 (one group per sequence)"
        )


# Counts that must be >= 1 and counts where 0 has a meaning (documented in configs/common.py) but a negative
# number none; checked when the config is parsed, before any work.
POSITIVE = ("train.steps", "train.batch_size", "train.seq_len", "train.log_every", "train.grad_accum")
NON_NEGATIVE = ("train.eval_every", "train.eval_steps", "checkpoint.every", "checkpoint.keep", "train.epochs")
CHOICES = {"train.on_nonfinite": ("stop", "skip")}


def _get(cfg: ml_collections.ConfigDict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def validate_counts(cfg: ml_collections.ConfigDict, positive: tuple[str, ...] = ()) -> None:
    """Refuse counts that would divide by zero or loop forever later (``positive`` adds keys the caller
    needs >= 1, e.g. train.py's checkpoint.every) and unknown choices."""
    for key in (*POSITIVE, *positive):
        value = _get(cfg, key)
        if isinstance(value, int) and value <= 0:
            raise UserError(f"{key}={value} must be at least 1; pass --config.{key}=<a positive number>")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        if isinstance(value, int | float) and value < 0:
            raise UserError(f"{key}={value} must not be negative (0 has a meaning; see configs/common.py)")
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in choices:
            raise UserError(f"{key}={value!r}; choose one of {', '.join(choices)}")


def parse_args(argv: list[str], default_config: str, flags: dict[str, Any]) -> tuple[ml_collections.ConfigDict, dict]:
    """Split ``argv`` into the config (with overrides applied, then locked) and the other flags. ``--help``
    prints the chosen config's sections and keys (``--config`` picks it) and exits 0."""
    spec = default_config
    overrides: list[tuple[str, str]] = []
    values = dict(flags)
    args = list(argv)
    if "-h" in args or "--help" in args:  # a config that does not load is an error, as without --help
        print(usage(load_config_file(_config_spec(args, default_config)), default_config, flags))
        raise SystemExit(0)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; flags look like --config.train.steps=100")
        name, eq, text = arg[2:].partition("=")
        if not eq:
            if not args:
                raise UserError(f"--{name} needs a value, e.g. --{name}=...")
            text = args.pop(0)
        if name == "config":
            spec = text
        elif name.startswith("config."):
            overrides.append((name[len("config.") :], text))
        elif name in values:
            values[name] = _parse_value(name, text, values[name]) if values[name] is not None else text
        else:
            hint = difflib.get_close_matches(name, ["config", *values], n=1)
            raise UserError(f"unknown flag --{name}" + (f"; did you mean --{hint[0]}?" if hint else ""))
    cfg = load_config_file(spec)
    for key, text in overrides:
        apply_override(cfg, key, text)
    validate(cfg)
    cfg.lock()
    return cfg, values


def _config_spec(args: list[str], default_config: str) -> str:
    """The ``--config`` among ``args`` (the last one given), else the default."""
    spec = default_config
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            spec = arg[len("--config=") :]
        elif arg == "--config" and i + 1 < len(args):
            spec = args[i + 1]
    return spec


def _keys(node: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _keys(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def usage(cfg: ml_collections.ConfigDict, default_config: str, flags: dict[str, Any]) -> str:
    """What ``--help`` prints: how to call, the flags, and every key of the loaded config with its value."""
    spec = cfg.config_spec
    lines = [
        "usage: [--config=configs/<family>.py[:variant]] [--config.<section>.<key>=<value> ...] "
        + " ".join(f"[--{k}=...]" for k in flags),
        f"  --config={spec}" + ("  (the default)" if spec == default_config else f"  (default: {default_config})"),
    ]
    lines += [f"  --{k}={v!r}" for k, v in flags.items()]
    lines.append(f"keys of {spec}, by section (override any with --config.<key>=<value>):")
    sections: dict[str, list[tuple[str, Any]]] = {}
    for key, value in _keys(cfg):
        if key != "config_spec":
            sections.setdefault(key.split(".")[0] if "." in key else "", []).append((key, value))
    for section, keys in sorted(sections.items(), key=lambda kv: kv[0] != ""):  # top-level keys first
        lines.append(f"  [{section}]" if section else "  [top level]")
        lines += [f"    {key} = {value!r}" for key, value in keys]
    return "\n".join(lines)


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    return json.loads(cfg.to_json_best_effort())


def family_config(model_cfg: ml_collections.ConfigDict, config_cls):
    """The ``model`` section -> the frozen family dataclass; unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in model_cfg.items() if k not in ("family",)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(
            f"model.{unknown[0]} is not a field of {config_cls.__name__}; fields: {', '.join(sorted(fields))}"
        )
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"model config: {e}") from None
