"""Ahead-of-time compilation of the real train step for a TPU topology, on a machine without TPUs.

    python train.py --config=configs/gpt.py:gpt2_small --config.mesh.fsdp=8 --compile_only=v5p:2x2x2
    python train.py --config=configs/gpt.py:gpt2_xl --config.mesh.fsdp=-1 --compile_only=v5p-64

JAX describes a TPU slice (its chips, cores and hosts) through libtpu without any TPU attached
(``jax.experimental.topologies``, as MaxText's train_compile.py does); the train step is lowered and
compiled by the TPU compiler for that slice, and XLA's memory analysis says what one device needs; its cost
analysis (extrapolated from small probes) gives FLOPs, bytes and the roofline. The batch comes from the
config (``example_row``): no data, no tokenizer, nothing written. libtpu is the extra ``pip install -e '.[aot]'``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

import numpy as np

from podformer import flops as flops_lib
from podformer import hardware, memory, optim, trainer
from podformer import mesh as mesh_lib
from podformer.core.errors import UserError
from podformer.data import span_corruption
from podformer.losses import LOSSES
from podformer.metrics import log
from podformer.model import attention, kernels, pipeline


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # as libtpu spells it in a topology: v5p:2x2x2
    dims: int  # 3: a 3-D torus (v4, v5p), 2: a 2-D one (v5e, v6e)
    cores_in_name: bool  # "v5p-64" counts TensorCores (2 per chip); "v5e-16" counts chips
    hbm_gib: float  # HBM per chip (= per JAX device: megacore on v4/v5p), from Google Cloud's TPU docs
    host_type: str  # a one-host accelerator type of this generation, for libtpu's environment
    chip_config: str = ""  # v4 exposes both cores of a chip as one device only with "megacore"


GENERATIONS = {
    "v4": Generation("v4", 3, True, 32, "v4-8", chip_config="megacore"),
    "v5p": Generation("v5p", 3, True, 95, "v5p-8"),
    "v5e": Generation("v5e", 2, False, 16, "v5litepod-4"),
    "v5litepod": Generation("v5e", 2, False, 16, "v5litepod-4"),
    "v6e": Generation("v6e", 2, False, 32, "v6e-4"),
}


def _slice_dims(chips: int, dims: int) -> tuple[int, ...]:
    """The standard slice shape for a chip count: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> ...
    (3-D) or 2x2 -> 2x4 -> 4x4 -> 4x8 ... (2-D), as Cloud TPU's accelerator types define them."""
    if chips < 1 or chips & (chips - 1):
        raise UserError(f"a TPU slice has a power-of-two number of chips, not {chips}")
    shape = [1] * dims
    if chips >= 4:
        shape[:2] = [2, 2]
    elif chips == 2:
        shape[0] = 2
    while int(np.prod(shape)) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)  # grow the last of the smallest axes
        shape[i] *= 2
    return tuple(sorted(shape, key=lambda d: (d == 1, d)))  # 2x2x1, as Cloud TPU spells it


def parse_topology(spec: str) -> tuple[Generation, str, int]:
    """``v5p:2x2x2`` (a libtpu topology) or ``v5p-64`` (a named slice), either with ``xS`` for S slices
    joined over the data-centre network (``v4-4096x2``, ``v5p:2x2x2x2``) -> (generation, libtpu topology
    of one slice, slice count)."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+)*)|-(\d+)(?:x(\d+))?)", spec.strip())
    gen = GENERATIONS.get(m.group(1)) if m else None
    if gen is None:
        known = ", ".join(GENERATIONS)
        raise UserError(
            f"--compile_only={spec}: expected GENERATION:AxBxC or GENERATION-N (e.g. v5p:2x2x2, v5p-64), with xS "
            f"for S slices (v5p-64x2), GENERATION one of {known}"
        )
    count = 1
    if m.group(2):
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) == gen.dims + 1:
            shape, count = shape[:-1], shape[-1]
        if len(shape) != gen.dims:
            example = f"{gen.name}:{'x'.join(['2'] * gen.dims)}"
            raise UserError(
                f"--compile_only={spec}: {gen.name} slices have {gen.dims} dimensions, e.g. {example} "
                f"(or {example}x2 for two slices)"
            )
    else:
        n = int(m.group(3))
        count = int(m.group(4) or 1)
        chips = n // 2 if gen.cores_in_name else n
        if gen.cores_in_name and n % 2:
            raise UserError(f"--compile_only={spec}: {gen.name}-N counts TensorCores, two per chip; N must be even")
        shape = _slice_dims(chips, gen.dims)
    if count < 1:
        raise UserError(f"--compile_only={spec}: the slice count must be at least 1")
    return gen, f"{gen.name}:{'x'.join(map(str, shape))}", count


def topology_devices(spec: str) -> tuple[Generation, list]:
    try:
        import libtpu  # noqa: F401  (only to give a clear message when it is missing)
    except ImportError:
        raise UserError(
            "--compile_only needs libtpu for the TPU compiler: pip install -e '.[aot]' (no TPU is needed)"
        ) from None
    from jax.experimental import topologies

    gen, name, count = parse_topology(spec)
    # libtpu reads this host's TPU identity from the environment (else from a GCE metadata server) when
    # it loads. Without TPUs: say "one host, no metadata server", so it neither waits nor warns. The
    # compiled topology comes from `name` alone.
    # It also takes a host-wide lock that any other process with libtpu installed may already hold (JAX
    # probes for TPUs at start-up); compiling touches no TPU, so sharing the library is safe.
    env = {"TPU_ACCELERATOR_TYPE": gen.host_type, "TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost"}
    for key, value in {**env, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
        os.environ.setdefault(key, value)
    kwargs = {"chip_config_name": gen.chip_config} if gen.chip_config else {}
    if count > 1:
        kwargs["num_slices"] = count
    try:
        devices = topologies.get_topology_desc(name, "tpu", **kwargs).devices
    except Exception as e:  # libtpu's own errors are long status strings: keep the first line
        raise UserError(f"--compile_only={spec}: libtpu rejected topology {name}: {str(e).splitlines()[0]}") from None
    return gen, list(devices)


ENCODER_OBJECTIVES = ("mlm", "roberta", "distill", "mlm_nsp", "mlm_sop")
SEQ2SEQ_OBJECTIVES = ("span_corruption", "prefix_lm", "bart")


def example_row(data_cfg, seq_len: int) -> dict[str, np.ndarray]:
    """One row of the run's batch from the config alone, in the key schema, shapes and dtypes that
    data/packing.py and data/rows.py produce (tests/test_pods.py checks them against the real rows), so
    compiling needs neither a dataset nor a tokenizer."""
    objective = data_cfg.objective
    i32 = lambda n: np.zeros(n, np.int32)  # noqa: E731
    f32 = lambda n: np.zeros(n, np.float32)  # noqa: E731
    if objective == "causal_lm":
        L = seq_len
        return {"inputs": i32(L), "targets": i32(L), "segment_ids": i32(L), "positions": i32(L), "loss_weights": f32(L)}
    if objective in ENCODER_OBJECTIVES:
        L = seq_len
        row = {"inputs": i32(L), "targets": i32(L), "loss_weights": f32(L), "segment_ids": i32(L)}
        row |= {"positions": i32(L), "token_types": i32(L)}
        if objective in ("mlm_nsp", "mlm_sop"):
            row["next_sentence_labels"] = np.zeros((), np.int32)
        return row
    if objective in SEQ2SEQ_OBJECTIVES:
        E = D = seq_len
        if objective == "span_corruption":
            _, D = span_corruption.random_spans_helper(seq_len, data_cfg.noise_density, data_cfg.mean_noise_span)
        row = {f"encoder_{k}": i32(E) for k in ("inputs", "segment_ids", "positions")}
        row |= {f"decoder_{k}": i32(D) for k in ("inputs", "targets", "segment_ids", "positions")}
        return row | {"decoder_loss_weights": f32(D)}
    known = ", ".join(("causal_lm", *ENCODER_OBJECTIVES, *SEQ2SEQ_OBJECTIVES))
    raise UserError(f"data.objective={objective!r}; choose one of {known}")


def compile_only(spec: str, cfg, model_cfg, module_cls) -> dict:
    """train.py --compile_only: the run's own model, optimizer, loss and batch layout, compiled for
    topology ``spec`` from the config alone (no data, no tokenizer, nothing written); logs and returns the
    per-device memory, the compiled program's FLOPs and bytes and the roofline bound. A program too big
    for the chips is a report with ``fits: False``, not an error."""
    t = cfg.train
    # Options after the slice, in any order: ":verbose", the memory breakdown's top 25 buffers and ops
    # instead of the top 5; ":memory", the memory and the fit alone, without the four cost probes (one
    # compile: seconds where the probes take minutes at preset widths, e.g. while searching a batch size).
    options = set()
    while spec.endswith((":verbose", ":memory")):
        spec, _, option = spec.rpartition(":")
        options.add(option)
    verbose = "verbose" in options
    kw = step_kwargs(cfg)
    model = lambda c: lambda rngs: module_cls(c, rngs=rngs)  # noqa: E731
    report = compile_train_step(spec, make_model=model(model_cfg), breakdown=True, model_cfg=model_cfg, **kw)
    report["remat"] = model_cfg.remat
    sizes = report.pop("param_sizes")
    ex = kw["example_row"]
    dec = ex["decoder_targets"].shape[0] if "decoder_targets" in ex else None
    model_flops = flops_lib.per_token(model_cfg, sizes, t.seq_len, dec) * t.batch_size * t.seq_len / report["devices"]
    report["model_flops"] = model_flops
    if "memory" in options:
        report["cost_note"] = "no cost analysis (:memory): drop it for the compiled FLOPs, bytes and roofline"
        log_report(report, verbose=verbose)
        return report
    # The compiler's cost analysis counts a loop body once: a scanned stack of L layers (and the
    # grad_accum micro-batch scan) would report about one layer and one micro-batch. So the cost is
    # measured on probes, unrolled programs of 1 and 2 layers at two small batches b and 2b with
    # grad_accum=1 (small programs compile in seconds and fit), and extrapolated: costs are linear in the
    # batch (rows) and in the layers, cost = fixed(L) + B * per_row(L), each of them c1 + (L-1)(c2-c1).
    # With pipeline stages the probes (unrolled stacks, no schedule) run on the same devices without stages:
    # the stages' devices become data parallel. A device then runs all layers on 1/S of the rows, which is
    # a stage's work (its N/S layers on its stage group's rows) without the bubble, added after.
    pipe = report.get("pipeline")
    dp = mesh_lib.data_parallel(report["mesh"]) * (pipe["stages"] if pipe else 1)
    b = dp  # one row per batch shard: the smallest probe that compiles where the full program barely fits
    probed = {
        (n, rows): compile_train_step(
            spec,
            make_model=model(layers(model_cfg, n)),
            quiet=True,
            **{**kw, "cfg": config_with(cfg, rows, unstaged=bool(pipe))},
        )
        for n in (1, 2)
        for rows in (b, 2 * b)
    }
    probes = {k: p["cost"] for k, p in probed.items()}
    bubble = pipe["iterations"] / (pipe["repeats"] * pipe["microbatches"]) if pipe else 1.0
    report |= cost_report(probes, b, t.batch_size, layer_count(model_cfg), model_flops, report["chip"], bubble)
    refused = [(k, p) for k, p in probed.items() if p["cost"] is None]
    if refused:
        (n, rows), p = refused[0]
        report["cost_note"] += f" ({n} layer(s) x {rows} rows asked for {p['peak_gib']:.2f} GiB)"
    notes = []
    if pipe:
        notes.append(
            f"stages: the cost probes ran without them on the same {report['devices']} devices (each then runs "
            f"all layers on 1/{pipe['stages']} of the rows: a stage's work), the layers' FLOPs and bytes times "
            f"{bubble:.4f} for the bubble's idle iterations; bytes read each weight once per pass, not once per "
            "micro-batch"
        )
    if t.grad_accum > 1:
        notes.append(f"bytes count one read of the weights per step, not one per each of {t.grad_accum} micro-batches")
    if notes:
        report["probe_note"] = "; ".join(notes)
    log_report(report, verbose=verbose)
    return report


def step_kwargs(cfg) -> dict:
    """What ``compile_train_step`` needs of the run config besides the model."""
    t = cfg.train
    return dict(
        cfg=cfg,
        tx=optim.make_optimizer(cfg.opt, t.steps),
        schedule=optim.schedule(cfg.opt, t.steps),
        loss=LOSSES[cfg.data.objective],
        example_row=example_row(cfg.data, t.seq_len),
    )


def config_with(cfg, batch_size: int, unstaged: bool = False):
    """``cfg`` at ``batch_size`` rows, one micro-batch; ``unstaged``: the mesh's stages data parallel instead
    (within a slice and across slices), on the same devices."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.train.batch_size, c.train.grad_accum = batch_size, 1
        if unstaged:
            m = c.mesh
            dcn_data, dcn_stage = int(m.get("dcn_data", -1)), int(m.get("dcn_stage", 1))
            m.data = -1 if int(m.data) == -1 else int(m.data) * int(m.get("stage", 1))
            m.dcn_data = -1 if dcn_data == -1 else dcn_data * dcn_stage
            m.stage, m.dcn_stage = 1, 1
    return c


def _period(model_cfg) -> int:
    """Layers that repeat as a unit: a mixture of experts in every moe_every-th layer repeats moe_every."""
    return model_cfg.moe_every if getattr(model_cfg, "num_experts", 0) else 1


def layers(model_cfg, n: int):
    """``model_cfg`` with ``n`` unrolled layer units (encoder-decoders: ``n`` on each side; a unit is one layer,
    or moe_every of them for a periodic mixture of experts); per-layer tuples (GPT-Neo's attention_layers)
    cut to match."""
    n *= _period(model_cfg)
    per_layer = {
        f.name: getattr(model_cfg, f.name)[:n]
        for f in dataclasses.fields(model_cfg)
        if isinstance(getattr(model_cfg, f.name), tuple) and len(getattr(model_cfg, f.name)) == model_cfg.num_layers
    }
    small = dataclasses.replace(model_cfg, num_layers=n, scan_layers=False, **per_layer)
    if hasattr(small, "num_decoder_layers"):
        small = dataclasses.replace(small, num_decoder_layers=n)
    return small


def layer_count(model_cfg) -> float:
    """The number of (encoder + decoder) layer units ``layers(cfg, n)`` scales, for the extrapolation."""
    if hasattr(model_cfg, "decoder_layers"):
        return (model_cfg.num_layers + model_cfg.decoder_layers) / 2 / _period(model_cfg)
    return model_cfg.num_layers / _period(model_cfg)


def compile_train_step(
    spec: str,
    *,
    cfg,
    make_model,
    tx,
    schedule,
    loss,
    example_row: dict,
    quiet: bool = False,
    breakdown: bool = False,
    model_cfg=None,
) -> dict:
    """Compile for ``spec``: the memory figures, whether they fit, the raw cost analysis (``cost``; None
    when the compiler refused the program). ``quiet``: no log lines (the cost probes). ``breakdown``: also
    the temporaries buffer by buffer (``buffers``: podformer/memory.py), from the compiler's buffer
    assignment, dumped into a temporary folder that is gone on return. ``model_cfg``: the full model's,
    for its pipeline schedule under mesh.stage (the probes pass none and run without stages)."""
    gen, devices = topology_devices(spec)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = pipeline.staged_rules(cfg.mesh.rules, mesh.shape)
    t = cfg.train
    processes = len({d.process_index for d in devices})
    dp = mesh_lib.data_parallel(mesh.shape)
    # The probes only need rows that the batch axes divide: each host's share matters to a real run's
    # input pipeline, not to the compiled program's cost.
    if (t.batch_size // t.grad_accum) % dp or (t.batch_size % processes and not quiet):
        raise UserError(
            f"train.batch_size={t.batch_size} (grad_accum={t.grad_accum}) must be divisible by the data-parallel size "
            f"data*fsdp*expert={dp} and by the {processes} hosts of {spec}"
        )
    graphdef, abstract = trainer.abstract_state(make_model, tx, t.seed)
    shardings = trainer.state_shardings(abstract, mesh, rules, strict=cfg.mesh.strict)
    example = {k: np.zeros((t.batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in example_row.items()}
    report = {
        "topology": spec,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "hosts": processes,
        "mesh": dict(mesh.shape),
        "hbm_gib": gen.hbm_gib,
        "chip": hardware.chip_of(devices[0].device_kind) or hardware.CHIPS[gen.name],
        "param_sizes": {k: int(np.prod(s)) for k, s in trainer.named_param_shapes(abstract).items()},
    }
    pipe = trainer.pipeline_schedule(cfg, model_cfg, mesh.shape) if model_cfg is not None else None
    if pipe is not None:
        report["pipeline"] = stage_report(pipe, report["param_sizes"], model_cfg.num_layers)
    if not quiet:
        log(
            f"compiling the train step for {spec} ({len(devices)} x {devices[0].device_kind}, {processes} hosts); "
            f"mesh {dict(mesh.shape)}"
        )
        if pipe is not None:
            log(f"{pipe.describe(model_cfg.num_layers)}; {report['pipeline']['line']}")
    # Pallas attention kernels are traced for the TPU, not refused for this host's CPU; matmuls stay XLA
    # dots even where this process opted in to the host BLAS (model/kernels.py).
    dump = tempfile.TemporaryDirectory(prefix="podformer-aot-") if breakdown else None
    options = {"xla_dump_to": dump.name, **memory.COMPILER_OPTIONS} if dump else None
    try:
        with kernels.use("xla"):
            compiled, _ = trainer.compile_train_step(
                graphdef, abstract, shardings, example, loss=loss, train_cfg=t, mesh=mesh, rules=rules,
                schedule=schedule, trace_context=attention.pallas_mode(target="tpu"), compiler_options=options,
                pipeline=pipe,
            )  # fmt: skip
        if dump:
            text = compiled.as_text()
            report["buffers"] = memory.breakdown(dump.name, text)
            report["peak_buffers"] = memory.at_peak(dump.name, text, report["buffers"])
            report["hlo_custom_calls"] = sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())))
    except Exception as e:  # jaxlib's XlaRuntimeError (its module moves between releases); only HBM exhaustion
        asked = hbm_exhausted(str(e))
        if asked is None:
            raise
        said = next((ln.strip() for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln), "")
        return report | {"fits": False, "peak_gib": asked, "refused": True, "cost": None, "compiler_said": said}
    finally:
        if dump:
            dump.cleanup()
    return report | memory_figures(compiled, gen) | {"refused": False, "cost": cost_of(compiled)}


def stage_report(pipe, param_sizes: dict, num_layers: int) -> dict:
    """What one pipeline stage holds: its share of the scanned stack (parameters with a leading layers axis)
    and the rest (embeddings, final norm, LM head), which every stage keeps whole. Every device of every
    stage runs the same SPMD program, so the compiler's per-device figures are each stage's."""
    stacked = sum(n for name, n in param_sizes.items() if ".layers." in f".{name}.")
    rest = sum(param_sizes.values()) - stacked
    per_stage = stacked // pipe.stages
    line = (
        f"each of {pipe.stages} stages holds {num_layers // pipe.stages} layers: {per_stage:,} parameters of the "
        f"stack + {rest:,} (embeddings, final norm, head) that every stage keeps"
    )
    return {
        "stages": pipe.stages,
        "microbatches": pipe.microbatches,
        "repeats": pipe.repeats,
        "bubble": pipe.bubble,
        "iterations": pipe.iterations,
        "stack_params_per_stage": per_stage,
        "shared_params": rest,
        "line": line,
    }


# XLA's TPU compiler refuses a program whose buffers cannot be placed in HBM with RESOURCE_EXHAUSTED:
# "Ran out of memory on HBM, the total memory required for HLO temporaries (54.12G) exceeds available HBM
# (15.75G)" (libtpu 0.0.x with jax 0.10), or "Used 54.11G of 15.75G hbm"; its G is GiB.
_EXHAUSTED = re.compile(
    r"Used ([\d.]+)([KMGT])? of [\d.]+[KMGT]? hbm|\(?([\d.]+)([KMGT])?\)? exceeds available HBM", re.I
)


def hbm_exhausted(message: str) -> float | None:
    """The GiB the compiler asked for when ``message`` is its out-of-HBM refusal (nan: not stated), else None."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = _EXHAUSTED.search(message)
    if m is None:
        return float("nan")
    value, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return float(value) * 1024.0 ** ("KMGT".index(unit or "G") - 2)


def cost_of(compiled) -> dict | None:
    """Per-device FLOPs and bytes accessed of the compiled (partitioned) program: XLA's cost analysis."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    if not c or "flops" not in c:
        return None
    return {"flops": float(c["flops"]), "bytes": float(c.get("bytes accessed", 0.0))}


def memory_figures(compiled, gen: Generation) -> dict:
    m = compiled.memory_analysis()
    gib = 2.0**30
    # Donated state aliases its outputs: the peak is arguments + temporaries + non-aliased outputs.
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    figures = {
        "arguments_gib": m.argument_size_in_bytes / gib,
        "temporaries_gib": m.temp_size_in_bytes / gib,
        "outputs_gib": m.output_size_in_bytes / gib,
        "aliased_gib": m.alias_size_in_bytes / gib,
        "code_gib": m.generated_code_size_in_bytes / gib,
        "peak_gib": (peak + m.generated_code_size_in_bytes) / gib,
    }
    return figures | {"fits": figures["peak_gib"] <= gen.hbm_gib}


# What the compiled program costs against the model FLOPs: full rematerialisation recomputes the forward
# pass (8N vs 6N, a ratio near 4/3), the optimizer, norms and softmax add a little. Outside this band
# the extrapolation is not trusted and no roofline is printed.
RATIO_BAND = (0.8, 3.0)


def extrapolate(probes: dict, b: int, batch: int, n_layers: float, key: str, layer_factor: float = 1.0) -> float:
    """``probes[(layers, rows)][key]`` at 1 and 2 layers x b and 2b rows -> the value at ``n_layers``, ``batch``;
    the layers' part (n_layers times one layer's increment) times ``layer_factor``."""
    per_row = {n: (probes[n, 2 * b][key] - probes[n, b][key]) / b for n in (1, 2)}
    fixed = {n: probes[n, b][key] - b * per_row[n] for n in (1, 2)}
    # f[1] is the rest (embeddings, head, optimizer) plus one layer; each layer adds f[2] - f[1]
    at = lambda f: f[1] - (f[2] - f[1]) + n_layers * layer_factor * (f[2] - f[1])  # noqa: E731
    return at(fixed) + batch * at(per_row)


def cost_report(
    probes: dict, b: int, batch: int, n_layers: float, model_flops: float, chip, layer_factor: float = 1.0
) -> dict:
    """The full step's per-device FLOPs and bytes from the probes, checked against the model FLOPs, and
    the roofline beside them; ``layer_factor`` scales the layers' part (a pipeline's bubble)."""
    out = {"model_flops": model_flops}
    if any(c is None for c in probes.values()):
        return out | {"cost_note": "no cost analysis: the 1- and 2-layer probes did not compile for these chips"}
    flops = extrapolate(probes, b, batch, n_layers, "flops", layer_factor)
    bytes_ = extrapolate(probes, b, batch, n_layers, "bytes", layer_factor)
    out |= {"flops": flops, "bytes": bytes_, "flops_ratio": flops / model_flops if model_flops else float("nan")}
    if not RATIO_BAND[0] <= out["flops_ratio"] <= RATIO_BAND[1]:
        return out | {"cost_note": f"compiled/model FLOPs {out['flops_ratio']:.2f} outside {RATIO_BAND}: no roofline"}
    r = hardware.roofline(flops, bytes_, chip)
    return out | {"roofline": r, "mfu_bound": hardware.mfu_bound(model_flops, r["step_s"], chip)}


def log_report(r: dict, verbose: bool = False) -> None:
    hbm = r["hbm_gib"]
    if r["refused"]:
        log(
            f"per device: the compiler asked for {r['peak_gib']:.2f} GiB ({r['compiler_said'][:160]}) of {hbm:g} "
            "GiB HBM and refused the program: DOES NOT FIT"
        )
        if r["peak_gib"] != r["peak_gib"]:  # nan: a message this parser does not know
            log(f"the compiler said: {r['compiler_said'][:300]}")
    else:
        new_outputs = r["outputs_gib"] - r["aliased_gib"]
        stages = " (every stage alike: one SPMD program)" if r.get("pipeline") else ""
        log(
            f"per device{stages}: {r['arguments_gib']:.2f} GiB arguments (state + batch), "
            f"{r['temporaries_gib']:.2f} GiB temporaries, {new_outputs:.2f} GiB new outputs, "
            f"{r['code_gib']:.3f} GiB code -> peak {r['peak_gib']:.2f} GiB of {hbm:g} GiB HBM: "
            + ("fits" if r["fits"] else "DOES NOT FIT")
        )
    if not r["fits"]:
        levers = [] if r.get("remat") == "full" else ["--config.model.remat=full (recompute activations)"]
        levers += [
            "a larger --config.mesh.fsdp (shard the state)",
            "--config.mesh.stage (pipeline stages: each device holds 1/stage of the layers)",
            "a smaller --config.train.batch_size or a larger --config.train.grad_accum (micro-batches)",
            "more chips",
        ]
        log("levers: " + ", ".join(levers))
    if r.get("buffers"):
        log_breakdown(r["buffers"], r["temporaries_gib"], top=25 if verbose else 5)
    if r.get("peak_buffers"):
        log_peak(r["peak_buffers"], top=25 if verbose else 5)
    chip = r["chip"]
    if "flops" in r:
        log(
            f"per device and step: compiled {r['flops'] / 1e12:.4g} TFLOPs, {r['bytes'] / 1e9:.4g} GB accessed; "
            f"model {r['model_flops'] / 1e12:.4g} TFLOPs (compiled/model {r['flops_ratio']:.2f})"
        )
    if "roofline" in r:
        rf = r["roofline"]
        log(
            f"roofline on {chip.name} ({chip.peak_flops / 1e12:g} TFLOP/s, {chip.hbm_bytes_per_s / 1e9:g} GB/s HBM; "
            f"{chip.source}): step >= {rf['step_s'] * 1e3:.4g} ms ({rf['bound']} bound; compute "
            f"{rf['compute_s'] * 1e3:.4g} ms, HBM {rf['memory_s'] * 1e3:.4g} ms), MFU <= {r['mfu_bound']:.1%} "
            "(communication not modelled)"
        )
    for note in ("probe_note", "cost_note"):
        if note in r:
            log(r[note])


def log_breakdown(buffers: list, temporaries_gib: float, top: int) -> None:
    """The largest temporaries and the ops that make them, out of the compiler's buffer assignment."""
    gib = 2.0**30
    listed = sum(b.credited for b in buffers) / gib
    # The TPU backend's buffer assignment as XLA dumps it; on large programs the compiler's final figure
    # can be larger (LLaMA-2 70B on v5p-512 with flash: 33.2 of 45.0 GiB): that rest is said, not guessed.
    rest = temporaries_gib - listed
    log(
        f"temporaries: {len(buffers)} buffers in the buffer assignment, {listed:.2f} GiB of the "
        f"{temporaries_gib:.2f} GiB"
        + (f" ({rest:.2f} GiB outside it, placed by later compiler passes)" if rest > 0.05 * temporaries_gib else "")
        + f"; the largest (--compile_only=SLICE:verbose for {25 if top < 25 else 'more'}):"
    )
    for b in buffers[:top]:
        where = f" ({b.source})" if b.source else ""
        log(f"  {b.credited / gib:8.3f} GiB  {b.shape:<32} {b.instruction}: {b.op or '(compiler-made)'}{where}")
    log("temporaries by op:")
    for op, size, n in memory.by_op(buffers)[:top]:
        log(f"  {size / gib:8.3f} GiB  {n:4d} buffer{'s' if n > 1 else ' '}  {op}")


def log_peak(buffers: list, top: int) -> None:
    """What is live at the worst moment: the buffers that decide whether a program fits."""
    gib = 2.0**30
    total = sum(b.size for b in buffers) / gib
    log(f"live at the heap peak (XLA's simulation, {total:.2f} GiB in {len(buffers)} buffers), by op:")
    for op, size, n in memory.by_op(buffers)[:top]:
        log(f"  {size / gib:8.3f} GiB  {n:4d} buffer{'s' if n > 1 else ' '}  {op}")
