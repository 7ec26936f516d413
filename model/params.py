"""Layout-independent parameter names: one flat dict per model whatever its layer layout.

Scanned stacks keep one array with a leading layer axis (``blocks.layers.attn.query.kernel``);
unrolled stacks keep a list (``blocks.layers.3.attn.query.kernel``). Both read and write the same
canonical names, ``blocks.3.attn.query.kernel``, so Hugging Face conversion and checkpoint layout
changes never depend on how the layers were stacked. Padding is a layout too: canonical token tables have
the tokenizer's ``vocab_size`` rows, the model's its ``padded_vocab_size`` (model/vocab.py); reading strips
the padding (zero, and never trained), writing pads with zeros.

Also here: parameters-only checkpoints in a podformer workdir (what ``python -m podformer.model.hf import`` writes
and what ``init.checkpoint`` reads), in the same Orbax layout ``train.py`` uses, so a training workdir
serves as an init checkpoint too.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from flax import nnx

from podformer.model import families, layers

# Saved with the model: trained parameters and untrained buffers (BART's final_logits_bias).
SAVED = (nnx.Param, layers.Buffer)
# Config fields that change how a model trains or runs, not which function it computes.
TRAINING_FIELDS = (
    "dropout",
    "attention_dropout",
    "init_std",
    "dtype",
    "scan_layers",
    "remat",
    "attention_impl",
    "vocab_multiple",
    # how a mixture of experts trains (dispatch, jitter, auxiliary weights), not which function it computes
    "moe_dispatch",
    "capacity_factor",
    "moe_group_size",
    "expert_capacity",
    "router_jitter",
    "moe_lb_weight",
    "moe_z_weight",
)


def _stacks(model: nnx.Module) -> dict[tuple, layers.BlockStack]:
    return {path: m for path, m in nnx.iter_modules(model) if isinstance(m, layers.BlockStack)}


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def _scanned_names(stack: layers.BlockStack, prefix: str, rest: tuple) -> list[str]:
    """The canonical names of one array of a scanned stack, layer by layer. A stack of BlockGroups
    (layers differing with a period) holds block j of group g as layer g * period + j."""
    if stack.period == 1:
        return [f"{prefix}.{i}.{_key(rest)}" for i in range(stack.num_layers)]
    j, tail = int(rest[1]), _key(rest[2:])  # rest = ('blocks', j, ...)
    return [f"{prefix}.{g * stack.period + j}.{tail}" for g in range(stack.num_layers // stack.period)]


def _vocab_axis(model: nnx.Module):
    """``(path, var) -> (axis, real vocab size) or None``: where a variable has padded vocabulary entries.
    The size is that of the innermost module with a family config holding the variable (a TrainState's
    model and teacher, a fine-tuning model's backbone may each have their own)."""
    owners = {
        path: m.cfg.vocab_size
        for path, m in nnx.iter_modules(model)
        if isinstance(getattr(getattr(m, "cfg", None), "vocab_size", None), int)
    }

    def find(path, var):
        axes = (var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None) or ()
        if "vocab" not in axes:
            return None
        owner = max((p for p in owners if path[: len(p)] == p), key=len, default=None)
        if owner is None:
            return None
        axis = list(axes).index("vocab")
        return (axis, owners[owner]) if var.shape[axis] != owners[owner] else None

    return find


def _strip(x, where):
    if where is None:
        return x
    axis, size = where
    return x[(slice(None),) * axis + (slice(0, size),)] if hasattr(x, "ndim") else x[:axis] + (size,) + x[axis + 1 :]


def _names(model: nnx.Module) -> dict[tuple, tuple[list[str], bool]]:
    """Each saved variable's path -> (the canonical names it holds, whether it is a scanned stack's: one
    array whose leading axis is the layer)."""
    stacks = _stacks(model)
    out = {}
    for path, _ in nnx.to_flat_state(nnx.state(model, SAVED)):
        stack_path = next((sp for sp in stacks if path[: len(sp)] == sp), None)
        if stack_path is None:
            out[path] = ([_key(path)], False)
            continue
        stack, rest, prefix = stacks[stack_path], path[len(stack_path) + 1 :], _key(stack_path)  # drop 'layers'
        if stack.scan:
            out[path] = (_scanned_names(stack, prefix, rest), True)
        else:
            out[path] = ([f"{prefix}.{rest[0]}.{_key(rest[1:])}"], False)
    return out


def _canonical(model: nnx.Module, read, index):
    """Canonical flat name -> ``read(value)`` (``index(x, i)`` takes layer i of a scanned stack)."""
    names = _names(model)
    vocab_axis = _vocab_axis(model)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, SAVED)):
        x = _strip(read(var.get_value() if hasattr(var, "get_value") else var), vocab_axis(path, var))
        layer_names, scanned = names[path]
        out.update({n: index(x, i) for i, n in enumerate(layer_names)} if scanned else {layer_names[0]: x})
    return out


def read_by(fn, model: nnx.Module, *args) -> set[str]:
    """Canonical names of the saved variables of ``model`` that ``fn(model, *args)``'s result depends on.

    Traced, never run (abstract models and ``jax.ShapeDtypeStruct`` arguments work): what a loss reads is
    what training it updates, so a head its objective never calls (BERT's NSP head under plain MLM) is
    known to be untrained without a table of objectives and heads."""
    graphdef, saved, rest = nnx.split(model, SAVED, ...)
    flat = nnx.to_flat_state(saved)

    def traced(values, rest, args):
        state = nnx.from_flat_state([(path, var.replace(v)) for (path, var), v in zip(flat, values, strict=True)])
        return fn(nnx.merge(graphdef, state, rest), *args)

    values = [var.get_value() for _, var in flat]
    closed = jax.make_jaxpr(traced)(values, rest, args)
    live = _live_inputs(closed.jaxpr, [True] * len(closed.jaxpr.outvars))[: len(values)]
    names = _names(model)
    return {n for (path, _), used in zip(flat, live, strict=True) if used for n in names[path][0]}


# Primitives that call one inner jaxpr once, its inputs and outputs those of the equation: followed inside.
# Anything else (scan, while, cond) counts as reading all of its inputs, which can only over-report.
_CALLS = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call")


def _live_inputs(jaxpr, live_out: list[bool]) -> list[bool]:
    from jax.extend.core import ClosedJaxpr, Jaxpr, Var

    live = {v for v, used in zip(jaxpr.outvars, live_out, strict=True) if used and isinstance(v, Var)}
    for eqn in reversed(jaxpr.eqns):
        outs = [isinstance(v, Var) and v in live for v in eqn.outvars]
        if not any(outs):
            continue
        inner = None
        if eqn.primitive.name in _CALLS:
            for p in eqn.params.values():
                j = p.jaxpr if isinstance(p, ClosedJaxpr) else p
                if isinstance(j, Jaxpr) and len(j.invars) == len(eqn.invars) and len(j.outvars) == len(outs):
                    inner = j
                    break
        ins = _live_inputs(inner, outs) if inner is not None else [True] * len(eqn.invars)
        live.update(v for v, used in zip(eqn.invars, ins, strict=True) if used and isinstance(v, Var))
    return [v in live for v in jaxpr.invars]


def get_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Canonical flat name -> numpy array (float32) for every saved variable of ``model``."""
    return _canonical(model, lambda v: np.asarray(jax.device_get(v)), lambda a, i: a[i])


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Canonical flat name -> shape; works on abstract models (``nnx.eval_shape``) too."""
    return _canonical(model, lambda v: tuple(v.shape), lambda s, i: s[1:])


def count(model: nnx.Module, *, padded: bool = False) -> int:
    """The number of trained parameters (nnx.Param; buffers are not counted), over the tokenizer's
    vocabulary, or with ``padded`` as the model holds them (over the padded one); abstract models too."""
    vocab_axis = _vocab_axis(model)
    return sum(
        math.prod(v.shape if padded else _strip(tuple(v.shape), vocab_axis(path, v)))
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )


def _place(value: np.ndarray, current):
    """``value`` placed by ``current``: a sharding, or the (possibly abstract) array it replaces and whose
    sharding it takes; else on the default device."""
    sharding = current if isinstance(current, jax.sharding.Sharding) else getattr(current, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(value, sharding)
    return jax.numpy.asarray(value)


def set_params(
    model: nnx.Module,
    flat: dict[str, np.ndarray],
    *,
    strict: bool = True,
    allow_missing: bool = False,
    shardings=None,
) -> list[str]:
    """Write canonical-named arrays into ``model`` in place (shapes and names checked). The model may be
    abstract (``nnx.eval_shape``); values keep the placement of what they replace, or take
    ``shardings`` (an nnx.State of shardings for ``nnx.state(model, SAVED)``). ``strict=False`` ignores
    values the model has no parameter for; with ``allow_missing`` parameters without a value keep
    theirs, and their names are returned."""
    stacks = _stacks(model)
    vocab_axis = _vocab_axis(model)
    state = nnx.state(model, SAVED)
    targets = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    seen: set[str] = set()
    missing: list[str] = []
    new_flat = []
    for path, var in nnx.to_flat_state(state):
        stack_path = next((sp for sp in stacks if path[: len(sp)] == sp), None)
        scanned = stack_path is not None and stacks[stack_path].scan
        if scanned:
            names = _scanned_names(stacks[stack_path], _key(stack_path), path[len(stack_path) + 1 :])
        else:
            names = [_key(path) if stack_path is None else _key(stack_path + path[len(stack_path) + 1 :])]
        absent = [n for n in names if n not in flat]
        if absent:
            if not allow_missing or len(absent) != len(names):
                raise KeyError(f"no value for parameter {absent[0]}")
            missing.extend(names)
            continue
        value = np.stack([np.asarray(flat[n]) for n in names]) if scanned else np.asarray(flat[names[0]])
        where = vocab_axis(path, var)
        if where is not None and value.ndim == var.ndim and value.shape[where[0]] == where[1]:
            pad = [(0, 0)] * value.ndim
            pad[where[0]] = (0, var.shape[where[0]] - where[1])
            value = np.pad(value, pad)  # the padding's rows are zero (model/vocab.py)
        if value.shape != var.shape:
            raise ValueError(f"parameter {names[0]}: expected shape {var.shape}, got {value.shape[-len(var.shape) :]}")
        seen.update(names)
        target = targets.get(path)
        current = target.get_value() if target is not None else var.get_value()
        new_flat.append((path, var.replace(_place(value.astype(var.dtype), current))))
    extra = sorted(set(flat) - seen)
    if strict and extra:
        raise KeyError(f"values given for parameters the model does not have: {extra[:5]}")
    nnx.update(model, nnx.from_flat_state(new_flat))
    return missing


def arch_diff(a, b) -> list[str]:
    """Fields in which two family configs describe different functions (training-only fields ignored)."""
    if type(a) is not type(b):
        return [f"family config {type(a).__name__} != {type(b).__name__}"]

    def norm(c, f):  # equivalent spellings of one function compare equal (0 = "the default size")
        v = getattr(c, f)
        if f == "head_dim":
            return c.resolved_head_dim
        if f == "num_decoder_layers":
            return c.decoder_layers
        if f == "d_ff":
            return v or 4 * c.d_model
        if f == "num_kv_heads":
            return v or c.num_heads
        if f == "rotary_dim":
            return (v or c.resolved_head_dim) if getattr(c, "position", "") == "rotary" else 0
        if f == "norm_bias" and getattr(c, "norm", "") == "rmsnorm":
            return False
        if f == "attention_layers":
            return () if set(v) <= {"global"} else tuple(v)
        return v

    return [
        f"{f.name}: {norm(a, f.name)!r} != {norm(b, f.name)!r}"
        for f in dataclasses.fields(a)
        if f.name not in TRAINING_FIELDS and norm(a, f.name) != norm(b, f.name)
    ]


# ---------------------------------------------------------------------------------------------------
# Parameters in podformer workdirs


def config_to_dict(family: str, cfg) -> dict:
    return {"family": family, **dataclasses.asdict(cfg)}


def config_from_dict(d: dict):
    """(family, family config) from a checkpoint's ``config.model`` section."""
    family = d.get("family")
    if family not in families.FAMILIES:
        raise ValueError(f"model family {family!r} is not one of {', '.join(families.FAMILIES)}")
    # Checkpoints written before vocabularies were padded hold tables of exactly vocab_size rows.
    d = {"vocab_multiple": 1, **d}
    config_cls = families.FAMILIES[family].config
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return family, config_cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields})


def _manager(workdir: str):
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    return ocp, ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))


def save_workdir(workdir: str, model: nnx.Module, family: str, meta: dict | None = None) -> str:
    """A parameters-only checkpoint (step 0) in ``workdir``; ``meta`` is stored beside it."""
    ocp, manager = _manager(workdir)
    meta = {"params_only": True, "step": 0, "config": {"model": config_to_dict(family, model.cfg)}, **(meta or {})}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave({"model": nnx.state(model, SAVED)}),
        data=ocp.args.JsonSave({"step": 0}),
        meta=ocp.args.JsonSave(meta),
    )
    manager.save(0, args=args, force=True)
    manager.wait_until_finished()
    manager.close()
    return os.path.join(os.path.abspath(workdir), "checkpoints", "0")


def is_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "checkpoints"))


def read_workdir(workdir: str, step: int | None = None) -> tuple[str, object, dict[str, np.ndarray], dict]:
    """(family, config, canonical params, meta) of a workdir's latest (or ``step``) checkpoint: a training
    run's or an imported one. Only the model is read, never the optimizer state; only the parameters that
    were imported or trained (``meta['untrained']`` lists the others)."""
    ocp, manager = _manager(workdir)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint in {workdir}/checkpoints")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    family, cfg = config_from_dict(meta["config"]["model"])
    module_cls = families.FAMILIES[family].module_class()
    abstract = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0)))
    target = {"model": nnx.state(abstract)}
    # Restore onto the default device, whatever the mesh that saved it: values are read back to numpy.
    device = jax.local_devices()[0]
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=jax.sharding.SingleDeviceSharding(device)), target
    )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        ),
    ).state
    manager.close()
    nnx.update(abstract, restored["model"])
    # Parameters never imported nor trained (an absent head, kept at its initialisation) are left out, as a
    # Hugging Face folder without them would be: nothing downstream mistakes them for learned values.
    untrained = set(meta.get("untrained", meta.get("missing", ())))
    return family, cfg, {k: v for k, v in get_params(abstract).items() if k not in untrained}, meta


def count_active(model: nnx.Module) -> float:
    """Parameters a token uses: as ``count``, with a mixture of experts' expert weights counted at their
    active share, experts_per_token / num_experts (routers and shared experts in full)."""
    shares = {
        path: m.o.experts_per_token / m.o.num_experts
        for path, m in nnx.iter_modules(model)
        if isinstance(m, layers.MoE)
    }
    vocab_axis = _vocab_axis(model)
    total = 0.0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(_strip(tuple(v.shape), vocab_axis(path, v)))
        owner = next((p for p in shares if path[: len(p)] == p and "experts" in path[len(p) :]), None)
        total += n * (shares[owner] if owner is not None else 1.0)
    return total
