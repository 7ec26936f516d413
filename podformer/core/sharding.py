"""Logical axis names -> mesh axes: parameter shardings and activation constraints from one rules table,
and the start-of-run report of what the rules could not shard (an error under mesh.strict)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

from podformer.core.errors import UserError

# The logical vocabulary every parameter and activation uses. The rules table in configs/common.py
# must map each of these to a mesh axis, a tuple of mesh axes, or None.
# activation_embed: the model dimension of activations at block boundaries (the saved residual stream).
LOGICAL_AXES = ("batch", "length", "embed", "activation_embed", "heads", "kv", "mlp", "vocab", "layers", "expert")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def resolve(
    axes: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None, mesh_shape: dict | None = None
) -> tuple[PartitionSpec, list[tuple[int, str]]]:
    """(PartitionSpec for logical ``axes``, the (dimension, mesh axis) pairs it could not use). A mesh
    axis is used at most once per array (a later dimension asking for it again goes without: the array
    is split by it already), and a mesh axis of size > 1 that does not divide its dimension is dropped:
    that dimension is replicated over it, and the pair is returned (``unsharded`` reports them)."""
    table = dict(rules)
    used: set[str] = set()
    spec, dropped = [], []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules; add it to mesh.rules")
        mesh_axes = tuple(a for a in _mesh_axes(table[name]) if a not in used)
        if mesh_shape is not None:
            # An axis the mesh lacks (a mesh built without 'expert') is size 1: nothing to shard over.
            mesh_axes = tuple(a for a in mesh_axes if mesh_shape.get(a, 1) > 1)
        if shape is not None and mesh_shape is not None:
            size = 1
            kept = []
            for a in mesh_axes:
                if shape[i] % (size * mesh_shape[a]) == 0:
                    kept.append(a)
                    size *= mesh_shape[a]
                else:
                    dropped.append((i, a))
            mesh_axes = tuple(kept)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec), dropped


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None, mesh_shape: dict | None = None
) -> PartitionSpec:
    """PartitionSpec for logical ``axes`` (``resolve``): a dimension that its mesh axes do not divide is
    replicated over them (e.g. one key/value head under tensor=2)."""
    return resolve(axes, rules, shape, mesh_shape)[0]


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for an (abstract) nnx.State whose Variables carry ``out_sharding`` metadata."""
    mesh_shape = dict(mesh.shape)

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding") or (None,) * len(x.shape)
            return x.replace(NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh_shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---------------------------------------------------------------------------------------------------
# What the rules could not shard: the start-of-run report and mesh.strict


@dataclasses.dataclass(frozen=True)
class Unsharded:
    """One dimension of one array that a mesh axis of size > 1 was meant to shard and could not."""

    name: str  # the parameter it belongs to (an optimizer-state array is named after its parameter)
    logical: str  # the dimension's logical axis ('heads')
    size: int  # the dimension's size
    mesh_axis: str
    mesh_size: int
    extra_bytes: float  # per device: held beyond what the sharded layout would have left it
    by_design: str = ""  # why this replication is intended; '' when it is not


# Replication that is deliberate, so reported as such and never an error under mesh.strict. Each entry:
# (array name pattern, logical axis, test on (dimension size, mesh axis size, the sibling query
# projection's size on that axis or None), why).
#  - Key/value projections of multi-query (PaLM: one head) and grouped-query attention (LLaMA-2 70B: 8
#    heads under tensor=16) have fewer heads than tensor shards: each shard computes query heads of one
#    group and needs that group's key/value head whole, so the heads are copied, as Megatron does. Only
#    when they are fewer than the query heads and evenly spread (mesh size a multiple of theirs); equal
#    counts (plain multi-head attention) that do not divide are an accident like any other.
KEY_VALUE = re.compile(r"(^|\.)(key|value)\.(kernel|bias)$")
BY_DESIGN = (
    (
        KEY_VALUE,
        "heads",
        lambda size, mesh_size, query: mesh_size % size == 0 and (query is None or query > size),
        "multi-query / grouped-query attention, each shard keeps its group's key/value head",
    ),
)


def _sibling_query(path: tuple, shapes: dict, logical: str) -> int | None:
    """The size on ``logical`` of the query projection next to a key/value one (same layer, same leaf)."""
    i = max(i for i, p in enumerate(path) if p in ("key", "value"))
    sibling = shapes.get(path[:i] + ("query",) + path[i + 1 :])
    if sibling is None or logical not in sibling[1]:
        return None
    return sibling[0][list(sibling[1]).index(logical)]


def unsharded(abstract_state, mesh: jax.sharding.Mesh, rules: Rules, name_of: Callable | None = None) -> list:
    """Every (array, dimension, mesh axis) of an (abstract) nnx.State that the rules could not shard, from
    shapes alone (no device work). ``name_of(path)`` names an array after the parameter it belongs to
    (default: its path), so an optimizer's copies add to their parameter's cost."""
    mesh_shape = dict(mesh.shape)
    variables = [
        (path, v)
        for path, v in nnx.to_flat_state(abstract_state)
        if isinstance(v, nnx.Variable) and v.get_metadata().get("out_sharding")
    ]
    shapes = {path: (tuple(v.shape), tuple(v.get_metadata()["out_sharding"])) for path, v in variables}
    out = []
    for path, v in variables:
        axes = shapes[path][1]
        spec, dropped = resolve(axes, rules, v.shape, mesh_shape)
        if not dropped:
            continue
        held = math.prod(v.shape) * jax.numpy.dtype(v.dtype).itemsize
        for entry in spec:
            held /= math.prod(mesh_shape[a] for a in _mesh_axes(entry))
        key = ".".join(str(p) for p in path)
        name = name_of(path) if name_of is not None else key
        for dim, mesh_axis in dropped:
            m, logical = mesh_shape[mesh_axis], axes[dim]
            why = next(
                (
                    reason
                    for pattern, axis, test, reason in BY_DESIGN
                    if axis == logical
                    and pattern.search(key)
                    and test(v.shape[dim], m, _sibling_query(path, shapes, axis))
                ),
                "",
            )
            out.append(Unsharded(name, logical, v.shape[dim], mesh_axis, m, held - held / m, why))
            held /= m  # a second dropped axis costs what is left after the first
    return out


def _compact(names) -> str:
    """'a.key.bias', 'a.key.kernel', 'a.value.bias', 'a.value.kernel' -> 'a.{key,value}.{bias,kernel}';
    the layers of an unrolled stack as one: 'blocks.layers.*.attn...'."""
    leaves = defaultdict(set)
    for n in {re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", n) for n in names}:
        head, _, leaf = n.rpartition(".")
        leaves[head].add(leaf)
    groups = defaultdict(list)
    for head, leaf in leaves.items():
        parent, _, last = head.rpartition(".")
        groups[(parent, tuple(sorted(leaf)))].append(last)

    def alt(xs):
        xs = sorted(x for x in xs if x)
        return xs[0] if len(xs) == 1 else "{" + ",".join(xs) + "}" if xs else ""

    return ", ".join(
        ".".join(p for p in (parent, alt(lasts), alt(leaf)) if p) for (parent, leaf), lasts in sorted(groups.items())
    )


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _groups(findings: list) -> dict:
    """(logical, size, mesh axis, mesh size, by_design) -> {parameter name: extra bytes}."""
    groups = defaultdict(lambda: defaultdict(float))
    for f in findings:
        groups[(f.logical, f.size, f.mesh_axis, f.mesh_size, f.by_design)][f.name] += f.extra_bytes
    return groups


def report(findings: list) -> str:
    """One line: every parameter a mesh axis of size > 1 could not shard, grouped by cause, and what that
    costs per device (optimizer state included, as it follows its parameter)."""
    if not findings:
        return "sharding: every parameter is sharded over the mesh axes its rules name"
    groups = _groups(findings)
    names = {f.name for f in findings}
    parts = []
    for (logical, size, axis, m, why), costs in sorted(groups.items(), key=lambda g: (bool(g[0][4]), g[0][:4])):
        cause = f"{logical}={size} over {axis}={m}" + (f" (by design: {why})" if why else "")
        parts.append(f"{cause}: {_compact(costs)} +{_bytes(sum(costs.values()))}")
    total = sum(f.extra_bytes for f in findings)
    n = f"{len(names)} parameter{'s' if len(names) > 1 else ''}"
    return (
        f"sharding: {n} not sharded by a mesh axis of size > 1, +{_bytes(total)} per device with their "
        "optimizer state: " + "; ".join(parts)
    )


# The config field behind each logical axis, for the fix a strict error suggests.
FIELDS = {
    "expert": "num_experts",
    "heads": "num_heads",
    "embed": "d_model",
    "mlp": "d_ff",
    "kv": "head_dim",
    "layers": "num_layers",
}


def check_strict(findings: list, num_devices: int) -> None:
    """mesh.strict: a UserError naming the first unintended replication (the costliest cause), the
    dimension, the mesh axis and the fix. Replication by design passes."""
    accidental = {k: v for k, v in _groups(findings).items() if not k[4]}
    if not accidental:
        return
    (logical, size, axis, m, _), costs = max(accidental.items(), key=lambda g: sum(g[1].values()))
    # Named after the costliest array, a query projection before its keys and values.
    names = sorted(costs, key=lambda n: (bool(KEY_VALUE.search(n)), ".query." not in n, -costs[n], n))
    kv = bool(KEY_VALUE.search(names[0]))
    sizes = [d for d in range(num_devices, 0, -1) if size % d == 0 and num_devices % d == 0]
    if logical == "vocab":
        what = f"the vocabulary's {size} rows"
        fixes = [f"a model.vocab_multiple divisible by {m} (default 128)"]
    else:
        field = "num_kv_heads" if kv and logical == "heads" else FIELDS.get(logical, f"{logical} dimension")
        what = f"{field}={size}"
        fixes = [f"a model.{field} divisible by {m}"] if logical in FIELDS else []
    fixes = [f"mesh.{axis}={' or '.join(map(str, sizes))}"] + fixes if sizes else fixes
    others = f" and {len(costs) - 1} more" if len(costs) > 1 else ""
    raise UserError(
        f"mesh.strict: {what} is not divisible by mesh.{axis}={m}: use {' or '.join(fixes)} ({names[0]}{others} "
        f"would be replicated, +{_bytes(sum(costs.values()))} per device; mesh.strict=false allows it)"
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation at a block boundary, from the active mesh and rules.
    A no-op outside a mesh, so models run unchanged on one device and in tests."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_to_spec(axes, rules, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def splits(axis: str, size: int) -> bool:
    """Whether the active mesh and rules split a dimension of logical ``axis`` and ``size``."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return False
    return logical_to_spec((axis,), rules, (size,), dict(mesh.shape))[0] is not None


def batch_spec(rules: Rules, ndim: int, mesh: jax.sharding.Mesh, batch_size: int) -> PartitionSpec:
    """The sharding of a (batch, ...) input array."""
    return logical_to_spec(
        ("batch",) + (None,) * (ndim - 1), rules, (batch_size,) + (1,) * (ndim - 1), dict(mesh.shape)
    )
