"""Pipeline stages over a scanned layer stack: the GPipe and circular schedules (README "Pipeline stages").

The stack's weights keep their [N layers, ...] layout (checkpoints are the same with or without stages); the
'layers' axis is sharded over the ``stage`` mesh axis, so stage s holds layers s*N/S .. (s+1)*N/S - 1. A
batch (B, ...) is cut into M micro-batches (rows strided, so each stays spread over the data-parallel
devices). One iteration runs every stage on the micro-batch in front of it -- one vmap over the stage
dimension, which GSPMD splits over the stage axis -- then shifts the activations one stage on (a
collective-permute). GPipe takes M + S - 1 iterations; S - 1 of them per stage are idle: the bubble.

Circular (``repeats`` R > 1): the N layers form R*S groups of N/(R*S), group g on stage g mod S, and each
micro-batch passes the ring of stages R times: R*M + S - 1 iterations, bubble (S-1)/(R*M+S-1). It needs
M >= S: a micro-batch leaving the last stage re-enters the first one M - S + 1 iterations later. The groups'
weights are regathered to their stages inside the step (stored layer order is contiguous, not round-robin):
an all-to-all of the stack's weights per step, the price of layout-free checkpoints.

The schedule is set around tracing (``use``) by the training library and read by the stack, the way the
sharding rules are; decoding with a KV cache and a stack traced outside ``use`` run the ordinary scan.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from podformer.core import sharding
from podformer.core.errors import UserError

STAGE = "stage"  # the mesh axis (podformer/mesh.py)
# Each layer's input inside a stage, by name: what every remat policy of a staged stack saves (pipeline_policy).
LAYER_INPUT = "pipeline_layer_input"


@dataclasses.dataclass(frozen=True)
class Schedule:
    stages: int  # S
    microbatches: int  # M
    repeats: int = 1  # R: 1 GPipe, > 1 circular
    label: str = dataclasses.field(default="mesh.stage", compare=False)  # S's name in errors

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """The share of stage-iterations that idle: (S-1) / (R*M + S-1)."""
        return (self.stages - 1) / self.iterations

    @property
    def name(self) -> str:
        return "GPipe" if self.repeats == 1 else f"circular ({self.repeats} repeats)"

    def describe(self, num_layers: int) -> str:
        S, M, R = self.stages, self.microbatches, self.repeats
        per = num_layers // (S * R)
        layers = f"{per} layer{'s' if per > 1 else ''}"
        groups = f"{layers} per stage" if R == 1 else f"{R} groups of {layers} per stage"
        return (
            f"pipeline: {self.name}, {S} stages x {M} micro-batches, {groups}, {self.iterations} iterations; "
            f"bubble (S-1)/({'R*' if R > 1 else ''}M+S-1) = {S - 1}/{self.iterations} = {self.bubble:.4f}"
        )

    def check(self, *, num_layers: int, scan: bool, batch: int, moe: bool = False) -> None:
        """One UserError line per misfit: the stack, the layer count, the micro-batches, the batch."""
        S, M, R = self.stages, self.microbatches, self.repeats
        if S < 2:
            return
        if not scan:
            raise UserError(
                f"{self.label}={S} splits a scanned layer stack; set --config.model.scan_layers=true "
                "(this stack is unrolled)"
            )
        if moe:
            raise UserError(f"{self.label}={S}: pipeline stages do not run mixture-of-experts layers; use mesh.expert")
        if R < 1 or M < 1:
            raise UserError(f"pipeline.microbatches={M} and pipeline.repeats={R} must be >= 1")
        if num_layers % (S * R):
            what = f"{self.label}={S}" + (f" x pipeline.repeats={R}" if R > 1 else "")
            raise UserError(
                f"model.num_layers={num_layers} is not divisible by {what} = {S * R}; each stage needs the same layers"
            )
        if R > 1 and M < S:
            raise UserError(
                f"pipeline.microbatches={M} is fewer than {self.label}={S}: the circular schedule (repeats={R}) needs "
                f"at least {S} (a micro-batch re-enters stage 0 after it leaves the last)"
            )
        if batch % M:
            raise UserError(
                f"the batch of {batch} rows (train.batch_size / train.grad_accum) is not divisible by "
                f"pipeline.microbatches={M}"
            )


_CURRENT: contextvars.ContextVar[Schedule | None] = contextvars.ContextVar("podformer_pipeline", default=None)


@contextlib.contextmanager
def use(schedule: Schedule | None):
    """Stacks traced inside run with ``schedule`` (None or 1 stage: the ordinary scan)."""
    token = _CURRENT.set(schedule if schedule is not None and schedule.stages > 1 else None)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> Schedule | None:
    return _CURRENT.get()


def _stage_sharded(a: jax.Array, dim: int) -> jax.Array:
    """``a`` split over the stage axis on ``dim``, its other dimensions left to the partitioner."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(STAGE, 1) == 1:
        return a
    spec = [PartitionSpec.UNCONSTRAINED] * a.ndim
    spec[dim] = STAGE
    return jax.lax.with_sharding_constraint(a, PartitionSpec(*spec))


def staged_rules(rules, mesh_shape) -> tuple:
    """The sharding rules of a mesh with pipeline stages: 'layers' -> stage (stage s holds its consecutive
    layers of a scanned stack), and the batch split over stage as well outside the stack (embeddings, head and
    loss: each stage group takes 1/stage of the rows). Without a stage axis the rules are returned as they are:
    a mesh without one must never be named in them (Flax checks every parameter's axes against the mesh)."""
    rules = tuple(tuple(r) for r in rules)
    if mesh_shape.get(STAGE, 1) == 1:
        return rules

    def add(entry):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        return axes if STAGE in axes else (*axes, STAGE)

    return tuple(
        (name, STAGE if name == "layers" else add(entry) if name == "batch" else entry) for name, entry in rules
    )


def _without_stage(rules):
    def drop(entry):
        if entry is None or isinstance(entry, str):
            return None if entry == STAGE else entry
        kept = tuple(a for a in entry if a != STAGE)
        return kept or None

    return tuple((name, drop(entry)) for name, entry in rules)


def run(
    layer: Callable,
    params,
    x_BLD: jax.Array,
    schedule: Schedule,
    *,
    rngs: jax.Array | None,
    per_layer: dict,
    batch_kwargs: dict,
    policy,
) -> jax.Array:
    """The stack's output for ``x_BLD`` under ``schedule``. ``layer(params, x, rng, per_layer, kwargs)``
    applies one layer; ``params``, ``rngs`` and ``per_layer`` have a leading N (layers) axis; array leaves of
    ``batch_kwargs`` with a leading B axis (masks, positions) follow their micro-batch, the rest are shared.

    ``policy``: the remat policy of one iteration (all stages), which must save ``LAYER_INPUT``. Each iteration
    is one jax.checkpoint: without it autodiff of the iteration loop keeps what each layer derives from its
    weights (their slices, casts) once per iteration -- (R*M + S - 1) copies of the stage's weights."""
    S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
    N = jax.tree.leaves(params)[0].shape[0]
    P = N // (S * R)
    B = x_BLD.shape[0]
    mb = B // M

    def micro(a):  # (B, ...) -> (M, B/M, ...): micro-batch j holds rows j, j + M, j + 2M, ...
        return a.reshape((mb, M) + a.shape[1:]).swapaxes(0, 1)

    def groups(a):  # (N, ...) -> (S, R, P, ...): layer (r*S + s)*P + p, stage dim sharded over 'stage'
        return _stage_sharded(a.reshape((R, S, P) + a.shape[1:]).swapaxes(0, 1), 0)

    leaves, treedef = jax.tree.flatten(batch_kwargs)
    batched = [hasattr(a, "shape") and a.ndim > 0 and a.shape[0] == B for a in leaves]
    leaves = [micro(a) if b else a for a, b in zip(leaves, batched, strict=True)]
    w = jax.tree.map(groups, params)
    layer_rngs = None if rngs is None else groups(rngs)
    per_layer = jax.tree.map(groups, per_layer)
    act = ("batch", "length", "activation_embed")[: x_BLD.ndim - 1]
    buf = sharding.constrain(micro(x_BLD), (None, *act))  # inputs, then each micro-batch's output

    def stage(w_RP, rng_RP, kw_RP, h, s, t):
        """Stage s at iteration t: micro-batch (t - s) mod M, layer group (t - s) // M (clipped: idle)."""
        k = t - s
        r, m = jnp.clip(k // M, 0, R - 1), jnp.mod(k, M)
        pick = (lambda a: a[0]) if R == 1 else (lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False))
        w_P, kw_P = jax.tree.map(pick, w_RP), jax.tree.map(pick, kw_RP)
        rng_P = None if rng_RP is None else jax.vmap(lambda key: jax.random.fold_in(key, m))(pick(rng_RP))
        mine = [
            jax.lax.dynamic_index_in_dim(a, m, 0, keepdims=False) if b else a
            for a, b in zip(leaves, batched, strict=True)
        ]
        kwargs = jax.tree.unflatten(treedef, mine)

        def body(h, xs):
            lp, lrng, lkw = xs
            return layer(lp, checkpoint_name(h, LAYER_INPUT), lrng, lkw, kwargs), None

        return jax.lax.scan(body, h, (w_P, rng_P, kw_P))[0]

    # spmd_axis_name: the blocks' own sharding constraints keep the stage dimension split over 'stage'; inside,
    # the rules name 'stage' for nothing else (the batch of a micro-batch in a stage is over data/fsdp only).
    vmapped = jax.checkpoint(jax.vmap(stage, in_axes=(0, 0, 0, 0, 0, None), spmd_axis_name=STAGE), policy=policy)
    inner_rules = _without_stage(flax_spmd.get_logical_axis_rules())

    def stages(*args):
        with nnx.logical_axis_rules(inner_rules):
            return vmapped(*args)

    stage_ids = jnp.arange(S, dtype=jnp.int32)

    # The buffer turns one slot per iteration: at iteration t slot j holds micro-batch (j + t) mod M, so stage 0
    # always reads slot 0 and the last stage's micro-batch (t - S + 1) mod M always lands in slot (1 - S) mod M.
    # Static slots, no dynamic indexing of the buffer: the partitioner keeps it (and its cotangent) sharded,
    # where dynamic slices of it had the whole batch's activations gathered onto every device (MT-NLG AOT).
    slot = (1 - S) % M

    def iteration(carry, t):
        out, buf = carry
        buf = sharding.constrain(buf, (None, *act))
        h = sharding.constrain(jnp.concatenate([buf[:1], out[:-1]], axis=0), ("layers", *act))  # the shift
        out = sharding.constrain(stages(w, layer_rngs, per_layer, h, stage_ids, t), ("layers", *act))
        k = t - (S - 1)  # the micro-batch the last stage just finished, if any
        done = (k >= 0) & (k < R * M)
        buf = buf.at[slot].set(jnp.where(done, out[S - 1], buf[slot]))
        buf = jnp.concatenate([buf[1:], buf[:1]], axis=0)  # turn: slot j + 1 -> j
        return (out, sharding.constrain(buf, (None, *act))), None

    out0 = jnp.zeros((S,) + buf.shape[1:], buf.dtype)
    T = schedule.iterations
    (_, buf), _ = jax.lax.scan(iteration, (out0, buf), jnp.arange(T, dtype=jnp.int32))
    buf = jnp.roll(buf, T % M, axis=0)  # slot j holds micro-batch (j + T) mod M: back to j
    return sharding.constrain(buf.swapaxes(0, 1).reshape(x_BLD.shape), ("batch", *act[1:]))
