"""How long a pretraining run takes, on what, and whether it fits: the planner.

    python -m podformer.plan --config=configs/gpt.py:gpt3_175b --hardware=v100x10000 --tokens=300e9 --days=34
    python -m podformer.plan --config=configs/gpt.py:llama_7b --hardware=v5p-256 --tokens=2e12 --mfu=0.4
    python -m podformer.plan --config=configs/gpt.py:gpt2_small --hardware=v5e-16 --tokens=10e9 --fit=compile
    python -m podformer.plan --notes        # the course notes' table: the MFU each reported time implies

FLOPs per token are podformer's own count (podformer/flops.py, PaLM's 6N + attention), over the parameters
of the config's model (jax.eval_shape, nothing allocated). Peak FLOP/s per chip: podformer/hardware.py.
Whether it fits: on TPUs the ahead-of-time compile of the real train step (``--fit=compile``, the same as
``train.py --compile_only``, for one slice or several); otherwise an analytic estimate, stated as such
(``--fit=analytic``).
The compute-optimal split is Chinchilla's (Hoffmann et al. 2022): C = 6 N D with D = 20 N.
"""

from __future__ import annotations

import math
import sys

from podformer import cli, hardware
from podformer import config as config_lib
from podformer import flops as flops_lib
from podformer.core.errors import UserError
from podformer.metrics import log

DEFAULT_CONFIG = "configs/gpt.py:gpt2_small"
FLAGS = {"hardware": "", "tokens": 0.0, "mfu": 0.0, "days": 0.0, "fit": "", "notes": False}
# PaLM 540B's measured MFU on 6,144 TPU v4 chips (Chowdhery et al. 2022, table 3: 46.2%); podformer's
# own benchmarks measure small models on one host, no figure for a pod. The planner's default, stated as such.
DEFAULT_MFU = 0.40
DEFAULT_MFU_SOURCE = "assumed (PaLM measured 46.2% on TPU v4; benchmarks/ has no pod-scale figure)"
TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio
SECONDS_PER_DAY = 86400.0
# Bytes per parameter of podformer's training state: float32 parameters, float32 gradients, AdamW's two
# float32 moments.
STATE_BYTES_PER_PARAM = 16

# The course notes' training-scale table: (label, config and overrides, hardware, tokens, days). The
# notes give "TPUs" for BERT; BERT-base was trained on 4 Cloud TPUs = 16 TPU v2 chips (Devlin et al. 2019,
# appendix A.2), RoBERTa on 1,024 V100 32GB (Liu et al. 2019, section 5), GPT-3 on V100s (Brown et al.
# 2020, section 2.3; the notes' 10,000 GPUs).
NOTES = [
    ("BERT (2018), 109M, 12 days on TPUs, 250B tokens", "configs/bert.py:base_uncased", "v2-32", 250e9, 12.0),
    ("RoBERTa (2019), 125M, 1 day on 1,024 GPUs, 2T tokens", "configs/roberta.py:base", "v100x1024", 2e12, 1.0),
    (
        "GPT-3 (2020), 175B, ~34 days on 10,000 GPUs, 300B tokens",
        "configs/gpt.py:gpt3_175b --config.train.seq_len=2048",
        "v100x10000",
        300e9,
        34.0,
    ),
]


def model_figures(cfg) -> dict:
    """Parameters and training FLOPs per token of the config's model (shapes only)."""
    # JAX and the models load here, not above: the planner's --help and config errors come before JAX.
    from flax import nnx

    from podformer.aot import example_row  # (loads JAX: see above)
    from podformer.model import families, params  # (loads JAX: see above)

    family = families.get(cfg.model.family)
    model_cfg = config_lib.family_config(cfg.model, family.config)
    module_cls = family.module_class()
    abstract = nnx.eval_shape(lambda: module_cls(model_cfg, rngs=nnx.Rngs(0)))
    # Named as train.py names them for the same count (podformer/trainer.py named_param_shapes).
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    sizes = {".".join(str(p) for p in path): math.prod(v.shape) for path, v in flat}
    row = example_row(cfg.data, cfg.train.seq_len)
    dec = row["decoder_targets"].shape[0] if "decoder_targets" in row else None
    return {
        "model_cfg": model_cfg,
        "module_cls": module_cls,
        "params": params.count(abstract),
        # The layer stack's share: what pipeline stages split (the rest every stage holds whole).
        "stack_params": sum(n for name, n in sizes.items() if ".layers." in f".{name}."),
        "flops_per_token": flops_lib.per_token(model_cfg, sizes, cfg.train.seq_len, dec),
    }


def schedule(flops_per_token: float, tokens: float, hw: hardware.Hardware, *, mfu=0.0, days=0.0) -> dict:
    """Total FLOPs; with ``days`` the MFU that time implies, else the time at ``mfu``; chip-hours."""
    total = flops_per_token * tokens
    peak = hw.chip.peak_flops * hw.chips
    if days > 0:
        seconds = days * SECONDS_PER_DAY
        mfu = total / (peak * seconds)
    else:
        seconds = total / (peak * mfu)
    return {
        "total_flops": total,
        "peak_flops": peak,
        "seconds": seconds,
        "mfu": mfu,
        "chip_hours": hw.chips * seconds / 3600,
    }


def chinchilla(total_flops: float) -> dict:
    """The compute-optimal parameters and tokens for ``total_flops``: C = 6 N D, D = 20 N."""
    n = math.sqrt(total_flops / (6 * TOKENS_PER_PARAM))
    return {"params": n, "tokens": TOKENS_PER_PARAM * n}


def analytic_memory(model_cfg, n_params: int, cfg, hw: hardware.Hardware, stack_params: int = 0) -> dict:
    """Per-chip bytes of a fully sharded (ZeRO-3 / fsdp over every chip) run: the training state split
    evenly, plus activations after Korthikanti et al. 2022: a layer's are 34 s b h bytes (16-bit; twice
    that in float32) and 5 a s^2 b for the attention scores. ``model.remat=full`` keeps each layer's input
    and recomputes one layer at a time; any other policy is counted as keeping every layer's activations
    (``none``; an upper bound for the ``save_*`` policies). The float32 logits and their gradient come on
    top. An estimate, stated as such.

    With S = mesh.stage pipeline stages (model/pipeline.py) a chip holds 1/S of the layer stack's state
    sharded over its stage's chips/S, and the rest (embeddings, head: ``n_params - stack_params``) sharded
    over chips/S only; it keeps its N/S layers' activations for the batch of its stage group (S times a
    chip's share of the batch), times the schedule's (R*M + S - 1) / (R*M) iterations (the bubble's idle
    stage-iterations run too). The logits stay a chip's share of the batch: outside the stack the rows are
    split over the stages too."""
    t = cfg.train
    stages = int(cfg.mesh.get("stage", 1)) * int(cfg.mesh.get("dcn_stage", 1))
    tokens = t.batch_size * t.seq_len / hw.chips / max(1, t.grad_accum)  # per chip and micro-batch
    d, heads, layers = model_cfg.d_model, model_cfg.num_heads, model_cfg.num_layers
    width = 2 if model_cfg.dtype == "bfloat16" else 4  # bytes per activation
    overhead, pipe = 1.0, None
    if stages > 1:
        from podformer.model import pipeline  # (loads JAX: see model_figures)

        if hw.chips % stages:
            raise UserError(f"mesh.stage={stages} does not divide the {hw.chips} chips of {hw.spec}")

        p = cfg.pipeline
        pipe = pipeline.Schedule(stages, int(p.microbatches) or 2 * stages, int(p.repeats))
        pipe.check(num_layers=layers, scan=model_cfg.scan_layers, batch=t.batch_size // max(1, t.grad_accum))
        overhead = pipe.iterations / (pipe.repeats * pipe.microbatches)
    rest = n_params - stack_params if stages > 1 else 0
    state = STATE_BYTES_PER_PARAM * ((n_params - rest) / hw.chips + rest * stages / hw.chips)
    group_tokens = tokens * stages  # a stage group's rows, per chip of the group
    layer = (34 * d * group_tokens + 5 * heads * t.seq_len * group_tokens) * width / 2
    stage_layers = layers / stages
    if model_cfg.remat == "full":
        kept, working = width * d * group_tokens * stage_layers * overhead, layer / pipe.microbatches if pipe else layer
    else:
        kept, working = layer * stage_layers * overhead, 0.0
    logits = 2 * 4 * tokens * model_cfg.vocab_size
    activations = kept + working + logits
    total = state + activations
    return {
        "state": state,
        "activations": activations,
        "total": total,
        "remat": model_cfg.remat,
        "stages": stages,
        "bubble": pipe.bubble if pipe else 0.0,
        "fits": total <= hw.chip.hbm_gib * 2**30,
    }


def plan(cfg, hw: hardware.Hardware, tokens: float, *, mfu: float = 0.0, days: float = 0.0, fit: str = "") -> dict:
    m = model_figures(cfg)
    mfu_source = "given" if mfu > 0 else DEFAULT_MFU_SOURCE
    s = schedule(m["flops_per_token"], tokens, hw, mfu=mfu or DEFAULT_MFU, days=days)
    out = {**m, **s, "chinchilla": chinchilla(s["total_flops"]), "hardware": hw}
    c = hw.chip
    log(
        f"model: {cfg.config_spec}, {m['params'] / 1e9:.3f}B parameters, {m['flops_per_token'] / 1e9:.3f} GFLOPs "
        f"per token (6N + attention at {cfg.train.seq_len} tokens); {tokens:.3g} tokens -> {s['total_flops']:.3e} FLOPs"
    )
    log(
        f"hardware: {hw.spec} = {hw.chips} x {c.name} ({c.peak_flops / 1e12:g} TFLOP/s peak each, {c.source}), "
        f"peak {s['peak_flops'] / 1e15:.4g} PFLOP/s"
    )
    if days > 0:
        log(f"{days:g} days imply MFU {s['mfu']:.1%}; {s['chip_hours']:.4g} chip-hours")
    else:
        log(
            f"at MFU {s['mfu']:.0%} ({mfu_source}): {s['seconds'] / SECONDS_PER_DAY:.4g} days "
            f"({s['seconds'] / 3600:.4g} h); {s['chip_hours']:.4g} chip-hours"
        )
    ch = out["chinchilla"]
    log(
        f"compute-optimal for {s['total_flops']:.3e} FLOPs (Chinchilla, 20 tokens/parameter): "
        f"{ch['params'] / 1e9:.3g}B parameters on {ch['tokens'] / 1e9:.4g}B tokens"
    )
    fit = fit or ("compile" if c.tpu and hw.slices == 1 else "analytic")
    if fit == "compile":
        if not c.tpu:
            raise UserError(f"--fit=compile compiles for TPU slices; {hw.spec} is not one (use --fit=analytic)")
        from podformer import aot  # JAX and libtpu load only for a compiled fit

        spec = hw.spec  # several slices: the DCN axis is mesh.dcn_data (-1: all of them), outermost
        out["fit"] = aot.compile_only(spec, cfg, m["model_cfg"], m["module_cls"])
        log(f"fits ({spec}, by the AOT compile): {'yes' if out['fit']['fits'] else 'NO'}")
    elif fit == "analytic":
        a = analytic_memory(m["model_cfg"], m["params"], cfg, hw, m["stack_params"])
        out["fit"] = a
        where = f"fsdp over all {hw.chips} chips"
        if a["stages"] > 1:
            per = hw.chips // a["stages"]
            where = f"{a['stages']} pipeline stages (bubble {a['bubble']:.3f}), fsdp over {per} chips each"
        log(
            f"fits (analytic estimate, {where}, remat {a['remat']}): "
            f"{a['state'] / 2**30:.3g} GiB "
            f"state + {a['activations'] / 2**30:.3g} GiB activations = {a['total'] / 2**30:.3g} GiB of "
            f"{c.hbm_gib:.3g} GiB per chip: {'yes' if a['fits'] else 'NO'}"
        )
    elif fit != "none":
        raise UserError(f"--fit={fit}: choose compile (TPU: the AOT compile), analytic or none")
    return out


def notes() -> list[dict]:
    rows = []
    for label, spec, hw_spec, tokens, days in NOTES:
        log(f"--- {label}")
        cfg, _ = config_lib.parse_args(f"--config={spec}".split(), DEFAULT_CONFIG, {})
        rows.append(plan(cfg, hardware.parse_hardware(hw_spec), tokens, days=days, fit="none"))
    return rows


def run(argv: list[str] | None = None) -> dict:
    cfg, flags = config_lib.parse_args(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG, FLAGS)
    if flags["notes"]:
        return {"notes": notes()}
    if not flags["hardware"] or flags["tokens"] <= 0:
        raise UserError("--hardware (e.g. v5p-1024, v4-6144x2, h100x512) and --tokens (e.g. 300e9) are required")
    if flags["mfu"] and flags["days"]:
        raise UserError("--mfu gives the time, --days the MFU: pass one of them")
    if not 0 <= flags["mfu"] <= 1:
        raise UserError(f"--mfu={flags['mfu']} is a fraction of peak, e.g. 0.4")
    hw = hardware.parse_hardware(flags["hardware"])
    return plan(cfg, hw, flags["tokens"], mfu=flags["mfu"], days=flags["days"], fit=flags["fit"])


def main() -> None:
    cli.main(run)


if __name__ == "__main__":
    main()
