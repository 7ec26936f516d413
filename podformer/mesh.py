"""The device mesh (stage, data, fsdp, expert, tensor), built once from the config, in the order of the physical torus.

Within a slice (one TPU slice's ICI torus, one GPU node's NVLink domain) the axes follow the torus; across
slices (the data-centre network, DCN) only ``stage``, ``data`` and ``fsdp`` may extend: ``mesh.dcn_stage``,
``mesh.dcn_data`` and ``mesh.dcn_fsdp`` say how many slices each axis spans, and that part of the axis is
its outermost one, so the expert and tensor axes, and the inner part of every axis, never leave a slice.
PaLM's two v4 pods are ``mesh.dcn_data=2``: data parallel across pods, model parallel within.

``mesh.stage`` (pipeline stages, podformer/model/pipeline.py) is the outermost axis within a slice: each
stage is a block of neighbouring chips holding its own layers, and only the activations of a micro-batch
cross from one stage's block to the next. ``mesh.dcn_stage`` puts stages on different slices (GPU nodes:
Megatron-LM's pipeline across nodes, tensor within): the run has dcn_stage x stage stages, stage s on slice
s // stage, and only the micro-batches' activations cross the DCN.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from podformer.core.errors import UserError

AXES = ("data", "fsdp", "expert", "tensor")
STAGE = "stage"  # pipeline stages: outside AXES, so resolve_shape and the DCN layout stay (data, fsdp, ...)
# Axes a mesh config may leave out (configs written before the axis existed): size 1.
OPTIONAL = ("expert",)


def resolve_shape(mesh_cfg, num_devices: int, where: str = "") -> tuple[int, ...]:
    """(data, fsdp, expert, tensor) from the config's sizes, -1 the rest; ``where`` names the devices in errors."""
    where = where or f"{num_devices} devices"
    sizes = [int(mesh_cfg.get(a, 1) if a in OPTIONAL else mesh_cfg[a]) for a in AXES]
    free = [a for a, s in zip(AXES, sizes, strict=True) if s == -1]
    if len(free) > 1:
        raise UserError(f"mesh: only one of data/fsdp/expert/tensor may be -1 (got {', '.join(free)})")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got {dict(zip(AXES, sizes, strict=True))}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if free:
        if num_devices % fixed:
            raise UserError(
                f"mesh {dict(zip(AXES, sizes, strict=True))} needs a device count divisible by {fixed}, but there are "
                f"{where}; the fixed sizes must multiply to one of {_divisors(num_devices)}"
            )
        sizes[AXES.index(free[0])] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise UserError(
            f"mesh data*fsdp*expert*tensor = {'*'.join(map(str, sizes))} = {int(np.prod(sizes))} does not match the "
            f"{where}; set mesh.data=-1 to use the rest, or sizes multiplying to {num_devices}"
        )
    return tuple(sizes)


def _divisors(n: int) -> str:
    d = [k for k in range(1, n + 1) if n % k == 0]
    return ", ".join(map(str, d)) if len(d) <= 12 else ", ".join(map(str, d[:10])) + f", ..., {n}"


def describe(devices) -> str:
    """``1024 TPU v5 devices in a 8x8x16 slice`` (devices that know their torus coordinates), else a count;
    ``2 slices of 512 ... in a 8x8x8 slice`` for several."""
    slices = _slice_ids(devices)
    if len(set(slices)) > 1:
        one = [d for d, s in zip(devices, slices, strict=True) if s == slices[0]]
        return f"{len(set(slices))} slices of {describe(one)}"
    shape = slice_shape(devices)
    if shape is None:
        return f"{len(devices)} devices"
    return f"{len(devices)} {devices[0].device_kind} devices in a {'x'.join(map(str, shape))} slice"


def _slice_ids(devices) -> list[int]:
    """Each device's slice: a TPU device's ``slice_index`` (multislice), else 0."""
    return [int(getattr(d, "slice_index", 0) or 0) for d in devices]


def slices(devices, count: int) -> list[list]:
    """``devices`` in ``count`` slices, in slice order, each in its own order.

    TPU devices say which slice they are on. Elsewhere a process is a slice when there are several (a GPU
    node: NVLink inside, the network between); one process's devices (fake CPU devices) are split into
    ``count`` consecutive groups. A count that the devices' own slices contradict is an error.
    """
    ids = _slice_ids(devices)
    if len(set(ids)) == 1 and count > 1:
        processes = [d.process_index for d in devices]
        if len(set(processes)) > 1:
            ids = processes
        elif len(devices) % count == 0:
            ids = [i * count // len(devices) for i in range(len(devices))]
    groups = {s: [d for d, i in zip(devices, ids, strict=True) if i == s] for s in sorted(set(ids))}
    if len(groups) != count:
        raise UserError(
            f"mesh.dcn_stage*mesh.dcn_data*mesh.dcn_fsdp = {count} slice(s), but the devices are in {len(groups)}; "
            f"set mesh.dcn_data={len(groups)} (data parallel across slices) or split {len(groups)} between "
            "dcn_stage, dcn_data and dcn_fsdp"
        )
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise UserError(f"the {count} slices hold different device counts ({sorted(sizes)}); slices must be alike")
    return list(groups.values())


def slice_shape(devices) -> tuple[int, ...] | None:
    """The torus a TPU slice's devices span (chips per axis), from their coordinates; None elsewhere."""
    ids = _slice_ids(devices)
    devices = [d for d, s in zip(devices, ids, strict=True) if s == ids[0]]  # slices are alike
    coords = [getattr(d, "coords", None) for d in devices]
    if any(c is None for c in coords):
        return None
    return tuple(int(max(c[i] for c in coords)) + 1 for i in range(len(coords[0])))


def device_grid(shape: tuple[int, ...], devices) -> np.ndarray:
    """``devices`` laid out as ``shape``, the last axis (tensor) innermost on neighbouring chips.

    JAX's torus assignment maps each mesh axis onto whole physical axes, innermost first; where a size is
    no product of whole axes (tensor=4 on an 8x8x16 v5p slice), one physical axis is split between two mesh
    axes, which keeps each group on a line of neighbouring chips. Off TPUs the order is jax.devices()'.
    """
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        pass
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        n = len(devices)
        works = [t for t in range(1, n + 1) if n % t == 0 and _fits((n // t, 1, 1, t), devices)]
        raise UserError(
            f"mesh {dict(zip((STAGE, *AXES)[-len(shape) :], shape, strict=True))} cannot be laid out on the torus "
            f"of {describe(devices)}; "
            f"tensor sizes that can: {', '.join(map(str, works[:12]))} (data/fsdp take the rest)"
        ) from None


def _fits(shape, devices) -> bool:
    try:
        mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return True
    except (ValueError, NotImplementedError, AssertionError):
        return False


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
    dcn_stages, dcn_data, dcn_fsdp = dcn_shape(mesh_cfg, len(set(_slice_ids(devices))))
    groups = slices(devices, dcn_stages * dcn_data * dcn_fsdp)
    where = describe(groups[0]) + (" per slice" if len(groups) > 1 else "")
    stages = stage_count(mesh_cfg, len(groups[0]), where)
    if stages > 1:
        where = f"{len(groups[0]) // stages} devices per stage ({stages} stages over {where})"
    ici = resolve_shape(mesh_cfg, len(groups[0]) // stages, where)
    # (slices, stage, data, fsdp, expert, tensor): the stage axis outermost within each slice
    grids = np.stack([device_grid((stages, *ici), g) for g in groups])
    # Slice s = ((dcn stage index) * dcn_data + (dcn data index)) * dcn_fsdp + (dcn fsdp index); each axis's
    # slice part is its outer part.
    grids = grids.reshape(dcn_stages, dcn_data, dcn_fsdp, stages, *ici)
    grids = grids.transpose(0, 3, 1, 4, 2, 5, *range(6, 4 + len(ici)))
    stages *= dcn_stages
    grid = grids.reshape(stages, dcn_data * ici[0], dcn_fsdp * ici[1], *ici[2:])
    # Auto axis types: shardings come from the logical rules and with_sharding_constraint, and XLA's
    # partitioner propagates the rest (jax.make_mesh's default is Explicit). The stage axis exists only with
    # stages: a mesh without them is (data, fsdp, expert, tensor), as before stages existed.
    axes = (STAGE, *AXES) if stages > 1 else AXES
    grid = grid if stages > 1 else grid[0]
    return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def stage_count(mesh_cfg, num_devices: int, where: str = "") -> int:
    """mesh.stage (default 1): pipeline stages, each over num_devices / stage devices of every slice."""
    stages = int(mesh_cfg.get(STAGE, 1))
    if stages < 1 or num_devices % stages:
        raise UserError(
            f"mesh.stage={stages} must be a positive divisor of the {where or f'{num_devices} devices'} "
            f"({_divisors(num_devices)})"
        )
    return stages


def dcn_shape(mesh_cfg, tpu_slices: int = 1) -> tuple[int, int, int]:
    """(dcn_stage, dcn_data, dcn_fsdp): how many slices the stage, data and fsdp axes span (1, 1, 1: one
    slice). dcn_data=-1 (the default) is the TPU slices that dcn_stage x dcn_fsdp leave: 1 on one slice, on
    GPUs and on CPUs (no slice indices: a process is a slice), where the other counts say how many."""
    stage, data, fsdp = (int(mesh_cfg.get(f"dcn_{a}", d)) for a, d in (("stage", 1), ("data", -1), ("fsdp", 1)))
    if stage < 1 or fsdp < 1 or data == 0 or data < -1:
        raise UserError(
            "mesh.dcn_stage, mesh.dcn_data (-1: the rest) and mesh.dcn_fsdp count slices (>= 1), got "
            f"{stage}, {data} and {fsdp}"
        )
    if data == -1:
        if tpu_slices > 1 and tpu_slices % (stage * fsdp):
            raise UserError(
                f"mesh.dcn_stage x mesh.dcn_fsdp = {stage * fsdp} does not divide the {tpu_slices} slice(s) of "
                "these devices"
            )
        data = max(1, tpu_slices // (stage * fsdp))
    return stage, data, fsdp


def check_batch(mesh: Mesh, global_batch: int, grad_accum: int) -> None:
    dp = data_parallel(mesh.shape)
    micro = global_batch // grad_accum
    if micro % dp:
        raise UserError(
            f"train.batch_size={global_batch} (micro-batch {micro} with grad_accum={grad_accum}) is not divisible "
            f"by the data-parallel size data*fsdp*expert={dp}; use a multiple of {dp}"
        )
    if global_batch % jax.process_count():
        raise UserError(f"train.batch_size={global_batch} must be divisible by the {jax.process_count()} processes")


def data_parallel(shape) -> int:
    """The batch's split: data x fsdp x expert (the expert axis carries batch rows in the dense layers)."""
    return int(shape["data"]) * int(shape["fsdp"]) * int(shape.get("expert", 1))
