"""The device mesh (data, fsdp, tensor), built once from the config."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from podformer.core.errors import UserError

AXES = ("data", "fsdp", "tensor")


def resolve_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg[a]) for a in AXES]
    free = [a for a, s in zip(AXES, sizes, strict=True) if s == -1]
    if len(free) > 1:
        raise UserError(f"mesh: only one of data/fsdp/tensor may be -1 (got {', '.join(free)})")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got {dict(zip(AXES, sizes, strict=True))}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if num_devices % fixed:
            raise UserError(
                f"mesh {dict(zip(AXES, sizes, strict=True))} needs a device count divisible by {fixed}, but there are "
                f"{num_devices} devices; change mesh.fsdp/mesh.tensor"
            )
        sizes[AXES.index(free[0])] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise UserError(
            f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {int(np.prod(sizes))} does not match the "
            f"{num_devices} devices; set mesh.data=-1 to use the rest, or change the sizes"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    if devices is None:
        devices = jax.devices()
        count = int(mesh_cfg.get("devices", 0))
        if count:  # the first N devices only: debugging on part of a host, tests on fake devices
            if jax.process_count() > 1:
                raise UserError("mesh.devices uses part of one host; with several processes leave it 0 (all devices)")
            if not 0 < count <= len(devices):
                raise UserError(f"mesh.devices={count}, but this host has {len(devices)} devices; 0 uses them all")
            devices = devices[:count]
    shape = resolve_shape(mesh_cfg, len(devices))
    # Auto axis types: shardings come from the logical rules and with_sharding_constraint, and XLA's
    # partitioner propagates the rest (jax.make_mesh's default is Explicit).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_batch(mesh: Mesh, global_batch: int, grad_accum: int) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = global_batch // grad_accum
    if micro % dp:
        raise UserError(
            f"train.batch_size={global_batch} (micro-batch {micro} with grad_accum={grad_accum}) is not divisible "
            f"by the data-parallel size data*fsdp={dp}; use a multiple of {dp}"
        )
    if global_batch % jax.process_count():
        raise UserError(f"train.batch_size={global_batch} must be divisible by the {jax.process_count()} processes")
