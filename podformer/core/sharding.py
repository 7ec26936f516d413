"""Logical axis names -> mesh axes: parameter shardings and activation constraints from one rules table."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec

# The logical vocabulary every parameter and activation uses. The rules table in configs/common.py
# must map each of these to a mesh axis, a tuple of mesh axes, or None.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None, mesh_shape: dict | None = None
) -> PartitionSpec:
    """PartitionSpec for logical ``axes``. A mesh axis is used at most once per array, and a dimension
    that its mesh axes do not divide is replicated instead (e.g. one key/value head under tensor=2)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules; add it to mesh.rules")
        mesh_axes = tuple(a for a in _mesh_axes(table[name]) if a not in used)
        if shape is not None and mesh_shape is not None:
            size = 1
            kept = []
            for a in mesh_axes:
                if shape[i] % (size * mesh_shape[a]) == 0:
                    kept.append(a)
                    size *= mesh_shape[a]
            mesh_axes = tuple(kept)
        mesh_axes = tuple(a for a in mesh_axes if mesh_shape is None or mesh_shape[a] > 1)
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for an (abstract) nnx.State whose Variables carry ``out_sharding`` metadata."""
    mesh_shape = dict(mesh.shape)

    def one(x):
        if isinstance(x, nnx.Variable):
            axes = x.get_metadata().get("out_sharding") or (None,) * len(x.shape)
            return x.replace(NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh_shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation at a block boundary, from the active mesh and rules.
    A no-op outside a mesh, so models run unchanged on one device and in tests."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_to_spec(axes, rules, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


def batch_spec(rules: Rules, ndim: int, mesh: jax.sharding.Mesh, batch_size: int) -> PartitionSpec:
    """The sharding of a (batch, ...) input array."""
    return logical_to_spec(
        ("batch",) + (None,) * (ndim - 1), rules, (batch_size,) + (1,) * (ndim - 1), dict(mesh.shape)
    )
