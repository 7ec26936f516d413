"""Train state, created sharded; the jitted train and eval steps."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from podformer.core import sharding
from podformer.core.errors import UserError
from podformer.losses import Loss
from podformer.metrics import log
from podformer.model import families, moe, params
from podformer.model import pipeline as pipeline_lib


class TrainState(nnx.Module):
    """The model and its optimizer; ``opt.step`` is the number of updates applied. A distillation run
    also holds its ``teacher``: sharded and checkpointed with the rest, never differentiated or updated
    (the optimizer and the gradients cover ``model`` only)."""

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, teacher: nnx.Module | None = None):
        self.model = model
        self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        if teacher is not None:
            self.teacher = teacher


MakeModel = Callable[[nnx.Rngs], nnx.Module]


def _train_state(make_model: MakeModel, tx, seed: int, make_teacher: MakeModel | None) -> TrainState:
    teacher = make_teacher(nnx.Rngs(seed + 1)) if make_teacher is not None else None
    return TrainState(make_model(nnx.Rngs(seed)), tx, teacher)


def abstract_state(make_model: MakeModel, tx, seed: int, make_teacher: MakeModel | None = None):
    """(graphdef, abstract state) with no memory allocated."""
    return nnx.split(nnx.eval_shape(lambda: _train_state(make_model, tx, seed, make_teacher)))


def create_state(make_model, tx, mesh, rules, seed: int, make_teacher: MakeModel | None = None):
    """The train state initialised directly into its shardings (never materialised replicated first).
    Returns (graphdef, state, state_shardings)."""
    graphdef, abstract = abstract_state(make_model, tx, seed, make_teacher)
    shardings = sharding.state_shardings(abstract, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(_train_state(make_model, tx, seed, make_teacher))[1]

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = init()
    return graphdef, state, shardings


def state_shardings(abstract, mesh, rules, *, strict: bool = False):
    """NamedShardings for a TrainState's abstract state (the optimizer state sharded like its parameters).
    On a mesh with an axis of size > 1 this also logs one line naming every parameter the rules could not
    shard there and what that costs per device, from shapes alone; ``strict`` (mesh.strict) makes an
    unintended one a UserError instead (podformer/core/sharding.py)."""
    if any(size > 1 for size in mesh.shape.values()):
        findings = sharding.unsharded(abstract, mesh, rules, name_of=_param_namer(abstract))
        if strict:
            sharding.check_strict(findings, mesh.size)
        log(sharding.report(findings))
    return sharding.state_shardings(abstract, mesh, rules)


def _param_namer(abstract):
    """A TrainState path -> the parameter it belongs to: the model's own name ('embed') for a model
    parameter and for its optimizer state, 'teacher.embed' for a distillation teacher's."""
    model = {tuple(path[1:]) for path, _ in nnx.to_flat_state(abstract) if path[0] == "model"}

    def name(path):
        tail = path
        if path[0] == "model":
            tail = path[1:]
        elif path[0] == "opt":
            tail = next((path[i:] for i in range(1, len(path)) if tuple(path[i:]) in model), path)
        return ".".join(str(p) for p in tail)

    return name


def param_summary(graphdef, state, model_cfg) -> str:
    """The model's parameter count, real and as held, from a TrainState's (abstract) state:
    '124,439,808 parameters (124,475,904 held: the vocabulary of 50,257 padded to 50,304)'."""
    model = nnx.merge(graphdef, state).model
    real, held = params.count(model), params.count(model, padded=True)
    if real == held:
        return f"{real:,} parameters"
    V, padded = model_cfg.vocab_size, model_cfg.padded_vocab_size
    return f"{real:,} parameters ({held:,} held: the vocabulary of {V:,} padded to {padded:,})"


def named_param_shapes(abstract) -> dict[str, tuple]:
    """Model parameter name -> shape, from a TrainState's (abstract) state."""
    return {
        ".".join(str(p) for p in path[1:]): v.shape
        for path, v in nnx.to_flat_state(abstract)
        if path[0] == "model" and isinstance(v, nnx.Param)
    }


def with_shardings(abstract, shardings):
    """Abstract arrays (ShapeDtypeStruct) carrying their target shardings, for restore and AOT compile."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _split_microbatches(batch: dict, accum: int, mesh, rules, global_batch: int) -> dict:
    """(B, ...) -> (accum, B/accum, ...) by striding, so every micro-batch stays spread over all
    data-parallel devices (contiguous chunks would put each micro-batch on a subset of them)."""

    def split(x):
        y = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        spec = sharding.batch_spec(rules, x.ndim, mesh, global_batch // accum)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, jax.sharding.PartitionSpec(None, *spec)))

    return {k: split(v) for k, v in batch.items()}


def train_step(
    state,
    batch,
    *,
    graphdef,
    loss: Loss,
    accum: int,
    seed: int,
    mesh,
    rules,
    global_batch,
    schedule,
    skip_nonfinite=False,
    pipeline=None,
):
    """One update. ``metrics['nonfinite']`` is 1 when the loss or the gradient norm is not finite; with
    ``skip_nonfinite`` such a step returns the state it was given (train.on_nonfinite=skip). ``pipeline``:
    the stages' schedule (model/pipeline.py), which every (grad_accum) micro-batch's forward runs under."""
    with pipeline_lib.use(pipeline):
        return _train_step(
            state, batch, graphdef, loss, accum, seed, mesh, rules, global_batch, schedule, skip_nonfinite
        )


def _train_step(state, batch, graphdef, loss, accum, seed, mesh, rules, global_batch, schedule, skip_nonfinite):
    before = jax.tree.map(lambda x: x, state) if skip_nonfinite else None  # a copy: merge shares Variables
    ts = nnx.merge(graphdef, state)
    step = ts.opt.step[...]
    # Dropout randomness depends only on (seed, step): exact resume. The key is made inside the trace, so
    # the step can be built for any mesh (podformer/aot.py: TPU topologies this host has no device of).
    rng = jax.random.fold_in(jax.random.key(seed), step)
    denom = loss.denominators(batch)
    model_def, params, rest = nnx.split(ts.model, nnx.Param, ...)
    extra = _teacher(ts)

    def grad_of(mb, mb_rng):
        def f(p):
            model = nnx.merge(model_def, p, rest)
            value, metrics = loss.fn(model, mb, mb_rng, denom, **extra)
            # Mixture-of-experts layers' auxiliary losses join the objective (each a mean over this
            # micro-batch's tokens, so 1/accum of it sums to the batch mean); ``loss`` stays the objective's.
            stats = {k: v / accum for k, v in moe.collect(model).items()}
            return value + stats.get("moe_aux_loss", 0.0), {**metrics, **stats}

        (_, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
        return grads, metrics

    if accum == 1:
        grads, metrics = grad_of(batch, rng)
    else:
        micro = _split_microbatches(batch, accum, mesh, rules, global_batch)

        def body(carry, xs):
            mb, i = xs
            g, m = grad_of(mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (g, m)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_of, jax.tree.map(lambda x: x[0], micro), rng))
        (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))

    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(step)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    metrics["nonfinite"] = jnp.logical_not(finite).astype(jnp.float32)
    ts.opt.update(ts.model, grads)
    after = nnx.state(ts)
    if skip_nonfinite:
        after = jax.tree.map(lambda new, old: jax.lax.select(finite, new, old), after, before)
    return after, metrics


def _teacher(ts: TrainState) -> dict:
    """The loss's extra argument in a distillation run: the (frozen) teacher."""
    return {"teacher": ts.teacher} if hasattr(ts, "teacher") else {}


def untrained_params(
    graphdef, abstract, example: dict, fresh: set[str] | None, *, loss: Loss, mesh, rules, global_batch: int
) -> list[str]:
    """Which of the ``fresh`` model parameters (never imported nor trained; None: all of them) training with
    ``loss`` leaves as they were initialised: those the loss never reads (traced on abstract values, never
    run), e.g. a head its objective never calls."""
    ts = nnx.merge(graphdef, abstract)
    teacher = _teacher(ts).get("teacher")
    teacher_def, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    batch = {k: jax.ShapeDtypeStruct((global_batch,) + v.shape[1:], v.dtype) for k, v in example.items()}

    def fn(model, batch, teacher_state):
        extra = {"teacher": nnx.merge(teacher_def, teacher_state)} if teacher_def is not None else {}
        return loss.fn(model, batch, jax.random.key(0), loss.denominators(batch), **extra)[0]

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        read = params.read_by(fn, ts.model, batch, teacher_state)
    return sorted((set(params.param_shapes(ts.model)) if fresh is None else fresh) - read)


def eval_step(state, batch, *, graphdef, loss: Loss, pipeline=None):
    """Sums (not means) of each metric and its denominator, so batches aggregate exactly."""
    ts = nnx.merge(graphdef, state)
    denom = loss.denominators(batch)
    ones = jax.tree.map(jnp.ones_like, denom)
    with pipeline_lib.use(pipeline):
        _, metrics = loss.fn(ts.model, batch, None, ones, **_teacher(ts))
    return {"sums": metrics, "denominators": denom}


def pipeline_schedule(cfg, model_cfg, mesh_shape) -> pipeline_lib.Schedule | None:
    """The run's pipeline schedule (None without stages), checked against the model, batch and mesh: each
    misfit is one UserError line. Micro-batches: pipeline.microbatches (0: 2 x stages) per grad_accum
    micro-batch, so the two compose (a step = grad_accum pipelined passes of M micro-batches each)."""
    stages = int(mesh_shape.get(pipeline_lib.STAGE, 1))
    if stages == 1:
        return None
    label = "mesh.stage" if int(cfg.mesh.get("dcn_stage", 1)) == 1 else "mesh.stage x mesh.dcn_stage"
    family = families.of(model_cfg)
    if family.kind != "decoder":
        raise UserError(
            f"{label}={stages}: pipeline stages run decoder-only models, not {family.name} ({family.kind}); "
            "shard it with mesh.fsdp/mesh.tensor"
        )
    p, t = cfg.pipeline, cfg.train
    sched = pipeline_lib.Schedule(stages, int(p.microbatches) or 2 * stages, int(p.repeats), label)
    rows = t.batch_size // t.grad_accum
    sched.check(num_layers=model_cfg.num_layers, scan=model_cfg.scan_layers, batch=rows, moe=model_cfg.num_experts > 0)
    dp = int(mesh_shape["data"]) * int(mesh_shape["fsdp"]) * int(mesh_shape.get("expert", 1))
    if (rows // sched.microbatches) % dp:
        raise UserError(
            f"pipeline micro-batches of {rows // sched.microbatches} rows ({rows} / pipeline.microbatches="
            f"{sched.microbatches}) are not divisible by the data-parallel size data*fsdp*expert={dp}"
        )
    return sched


def batch_shardings(example: dict, mesh, rules, global_batch: int) -> dict:
    return {
        k: NamedSharding(mesh, sharding.batch_spec(rules, len(v.shape), mesh, global_batch)) for k, v in example.items()
    }


def jit_train_step(
    graphdef,
    state_shardings,
    batch_shard,
    *,
    loss,
    accum,
    seed,
    mesh,
    rules,
    global_batch,
    schedule,
    skip_nonfinite=False,
    pipeline=None,
):
    fn = functools.partial(
        train_step,
        graphdef=graphdef,
        loss=loss,
        accum=accum,
        seed=seed,
        mesh=mesh,
        rules=rules,
        global_batch=global_batch,
        schedule=schedule,
        skip_nonfinite=skip_nonfinite,
        pipeline=pipeline,
    )
    return jax.jit(
        fn, in_shardings=(state_shardings, batch_shard), out_shardings=(state_shardings, None), donate_argnums=0
    )


def jit_eval_step(graphdef, state_shardings, batch_shard, *, loss, pipeline=None):
    return jax.jit(
        functools.partial(eval_step, graphdef=graphdef, loss=loss, pipeline=pipeline),
        in_shardings=(state_shardings, batch_shard),
    )


def compile_train_step(
    graphdef,
    abstract,
    shardings,
    example: dict,
    *,
    loss,
    train_cfg,
    mesh,
    rules,
    schedule,
    trace_context=None,
    compiler_options: dict | None = None,
    pipeline=None,
):
    """The train step compiled ahead of the loop for the layout of ``example`` (one host batch, or the
    global one), so its memory is known before the first step. ``trace_context`` is entered around
    tracing and compiling too (podformer/aot.py: Pallas kernels traced for a TPU). Returns (compiled
    step, batch shardings)."""
    t = train_cfg
    batch_shard = batch_shardings(example, mesh, rules, t.batch_size)
    abstract_batch = {
        k: jax.ShapeDtypeStruct((t.batch_size,) + v.shape[1:], v.dtype, sharding=batch_shard[k])
        for k, v in example.items()
    }
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), trace_context or contextlib.nullcontext():
        step = jit_train_step(
            graphdef,
            shardings,
            batch_shard,
            loss=loss,
            accum=t.grad_accum,
            seed=t.seed,
            mesh=mesh,
            rules=rules,
            global_batch=t.batch_size,
            schedule=schedule,
            skip_nonfinite=t.get("on_nonfinite", "stop") == "skip",
            pipeline=pipeline,
        )
        lowered = step.lower(with_shardings(abstract, shardings), abstract_batch)
        return lowered.compile(compiler_options=compiler_options), batch_shard
