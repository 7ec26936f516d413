"""Pretraining entry point: flags -> config -> mesh -> state -> data -> loop.

python train.py                                         # configs/gpt.py:tiny on the embedded corpus, CPU
python train.py --config=configs/gpt.py:gpt2_small --config.mesh.fsdp=8 --workdir=gs://bucket/run
python train.py --workdir=runs/gpt_tiny                 # again: resumes from the latest checkpoint
"""

from __future__ import annotations

import sys

from podformer import cli, preemption

DEFAULT_CONFIG = "configs/gpt.py:tiny"
# --compile_only=v5p:2x2x2 (or a named slice, v5p-64): compile the train step for that TPU topology on
# this machine, print its per-device memory and whether it fits in HBM, and stop (podformer/aot.py).
FLAGS = {"workdir": "", "compile_only": ""}

if __name__ == "__main__":  # --help and config errors answer before JAX loads (it takes seconds), and a
    # signal while JAX loads already exits 75 (podformer/preemption.py)
    preemption.guard_startup()
    cli.first_contact(sys.argv[1:], DEFAULT_CONFIG, FLAGS)

import dataclasses  # noqa: E402  (the imports after the first-contact check)
import os  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from podformer import (  # noqa: E402
    aot,
    checkpoint,
    distillation,
    distributed,
    generate,
    hostmem,
    loop,
    optim,
    preemption,
    profiling,
    trainer,
    workdir_lock,
)
from podformer import config as config_lib  # noqa: E402
from podformer import flops as flops_lib  # noqa: E402
from podformer import mesh as mesh_lib  # noqa: E402
from podformer.core.errors import UserError  # noqa: E402
from podformer.data import hf_tokenizer, pipeline  # noqa: E402
from podformer.data.loader import Loader  # noqa: E402
from podformer.losses import LOSSES  # noqa: E402
from podformer.metrics import MetricWriter, log  # noqa: E402
from podformer.model import families, hf, params  # noqa: E402
from podformer.model import pipeline as pipeline_lib  # noqa: E402


def run(argv: list[str] | None = None) -> dict:
    cfg, flags = config_lib.parse_args(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG, FLAGS)
    config_lib.validate_counts(cfg, positive=("checkpoint.every",))
    hostmem.keep_freed_memory()  # before JAX starts its threads; CPU runs only (podformer/hostmem.py)
    distributed.initialize(cfg.distributed)
    workdir = flags["workdir"] or os.path.join("runs", cfg.name)
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)  # Orbax needs absolute paths
    if flags["compile_only"]:  # compile-only writes nothing, not even a workdir: no check, no lock
        return _run(cfg, flags, workdir)
    checkpoint.check_workdir(workdir)
    with workdir_lock.hold(workdir):  # one writer per workdir
        return _run(cfg, flags, workdir)


def _run(cfg, flags: dict, workdir: str) -> dict:
    profiler = profiling.Profiler(cfg.profile, workdir)  # validates profile.steps before any work
    done = None if flags["compile_only"] else finished(workdir, cfg.train.steps)
    if done is not None:  # nothing to train: say so before any data is built or anything compiled
        return {"step": done, "complete": True, "preempted": False}

    family = families.get(cfg.model.family)
    model_cfg = config_lib.family_config(cfg.model, family.config)
    module_cls = family.module_class()
    t = cfg.train
    if getattr(model_cfg, "position", "learned") == "learned" and t.seq_len > model_cfg.max_len:
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds model.max_len={model_cfg.max_len}; lower one or raise the other"
        )

    teacher = distillation.load(cfg, model_cfg) if cfg.data.objective == "distill" else None
    make_teacher = teacher.make if teacher is not None else None

    if flags["compile_only"]:
        return aot.compile_only(flags["compile_only"], cfg, model_cfg, module_cls)

    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(mesh, t.batch_size, t.grad_accum)
    rules = pipeline_lib.staged_rules(cfg.mesh.rules, mesh.shape)  # the rules as given without mesh.stage
    log(
        f"podformer: {cfg.config_spec} -> {workdir}; mesh {dict(mesh.shape)} over {mesh.size} "
        f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)"
    )
    pipe = trainer.pipeline_schedule(cfg, model_cfg, mesh.shape)  # None without mesh.stage
    if pipe is not None:
        log(pipe.describe(model_cfg.num_layers))

    def make_model(rngs):
        return module_cls(model_cfg, rngs=rngs)

    # The state's layout, from shapes alone, before the data: what the mesh cannot shard is reported (or,
    # with mesh.strict, refused) in seconds, not after a tokenizer has been trained.
    tx = optim.make_optimizer(cfg.opt, t.steps)
    schedule = optim.schedule(cfg.opt, t.steps)
    graphdef, abstract = trainer.abstract_state(make_model, tx, t.seed, make_teacher)
    shardings = trainer.state_shardings(abstract, mesh, rules, strict=cfg.mesh.strict)

    # The newest intact checkpoint (damaged ones moved aside) and its config, compared with this run's before
    # any data is built.
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step()
    meta = ckpt.restore_meta(latest) if latest is not None else None
    if meta is not None and not meta.get("params_only"):
        checkpoint.check_same_run(workdir, latest, meta, config_lib.to_dict(cfg))

    data = pipeline.build(cfg.data, vocab_size=model_cfg.vocab_size, seq_len=t.seq_len)
    log(f"data: {data.description}; unigram entropy {data.unigram_entropy:.3f} nats/token")
    if jax.process_index() == 0:  # the tokenizer travels with the model: resume, fine-tune and export read it
        hf_tokenizer.keep(data.tokenizer, os.path.join(workdir, "tokenizer"))
    writer = MetricWriter(workdir)

    # Resume order: the latest complete checkpoint in this workdir -> init.checkpoint (parameters only, from a
    # podformer workdir or a Hugging Face folder; the optimizer starts fresh) -> from scratch.
    start_step, data_state = 0, None
    fresh = None  # the parameters never imported nor trained (None: all of them)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        if latest is not None:
            if meta.get("params_only"):
                raise UserError(
                    f"{workdir} holds imported parameters, not a training run; pass it as "
                    f"--config.init.checkpoint={workdir} and train into a new --workdir"
                )
            # Checkpoints from before vocabularies were padded have no vocab_multiple: theirs was 1.
            saved = dataclasses.replace(model_cfg, vocab_multiple=meta["config"]["model"].get("vocab_multiple", 1))
            if saved.padded_vocab_size != model_cfg.padded_vocab_size:
                raise UserError(
                    f"{workdir}: the checkpoint's token tables are padded with vocab_multiple={saved.vocab_multiple}; "
                    f"resume with --config.model.vocab_multiple={saved.vocab_multiple} or start a new --workdir"
                )
            if meta.get("tokenizer") != data.tokenizer.fingerprint:
                raise UserError(
                    f"{workdir}: the checkpoint was trained with tokenizer {meta.get('tokenizer')}, this run has "
                    f"{data.tokenizer.fingerprint}; use the same data.tokenizer or a new --workdir"
                )
            state, data_state, meta = ckpt.restore(latest, trainer.with_shardings(abstract, shardings))
            start_step, fresh = latest, set(meta.get("untrained", ()))
            log(f"resumed from {ckpt.directory}/{latest}")
        else:
            _, state, _ = trainer.create_state(make_model, tx, mesh, rules, t.seed, make_teacher)
            if cfg.init.checkpoint:
                state, fresh = init_from(cfg.init.checkpoint, cfg.model.family, model_cfg, graphdef, state)
            if teacher is not None:
                state = distillation.place(teacher, graphdef, state)

    loader = Loader(
        data.train_rows,
        global_batch=t.batch_size,
        mesh=mesh,
        rules=rules,
        seed=t.seed,
        num_workers=cfg.data.num_workers,
        prefetch=cfg.data.prefetch,
    )
    if data_state is not None:
        loader.set_state(data_state)
    # One line per step: what a killed run logged after its checkpoint (or with none) is about to be redone.
    writer.truncate_after(start_step if start_step else -1)
    counters = {"skipped_steps": meta.get("skipped_steps", 0) if start_step else 0}

    loss = teacher.loss if teacher is not None else LOSSES[cfg.data.objective]
    step_fn, batch_shard = trainer.compile_train_step(
        graphdef, abstract, shardings, loader.host_batch(0), loss=loss, train_cfg=t, mesh=mesh, rules=rules,
        schedule=schedule, pipeline=pipe,
    )  # fmt: skip
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        eval_fn = trainer.jit_eval_step(graphdef, shardings, batch_shard, loss=loss, pipeline=pipe)
    # What the objective trains; the rest (a head it never calls) is never exported (podformer/model/hf.py).
    untrained = trainer.untrained_params(
        graphdef, abstract, loader.host_batch(0), fresh, loss=loss, mesh=mesh, rules=rules, global_batch=t.batch_size
    )
    mem = step_fn.memory_analysis()
    if mem is not None:
        log(
            f"train step compiled: per device {mem.argument_size_in_bytes / 2**20:.1f} MiB arguments, "
            f"{mem.temp_size_in_bytes / 2**20:.1f} MiB temporaries, {mem.output_size_in_bytes / 2**20:.1f} MiB outputs"
        )

    sizes = {k: int(np.prod(shape)) for k, shape in trainer.named_param_shapes(abstract).items()}
    flops_per_token = flops_lib.per_token(model_cfg, sizes, t.seq_len, flops_lib.decoder_len(loader.host_batch(0)))
    peak, peak_source = flops_lib.peak_per_device(cfg.metrics.peak_tflops)
    log(
        f"model: {trainer.param_summary(graphdef, abstract, model_cfg)}, {flops_per_token / 1e6:.1f} MFLOPs/token; "
        f"peak {peak / 1e12:.2f} TFLOP/s per device ({peak_source})"
    )

    val_loader = Loader(
        data.validation_rows, global_batch=t.batch_size, mesh=mesh, rules=rules, shuffle=False, prefetch=1
    )

    def evaluate(state, step):
        val_loader.set_state({"step": 0, "global_batch": t.batch_size})
        sums, denoms = {}, {}
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            for _ in range(t.eval_steps):
                out = jax.device_get(eval_fn(state, next(val_loader)))
                for k, v in out["sums"].items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                for k, v in out["denominators"].items():
                    denoms[k] = denoms.get(k, 0.0) + float(v)
        result = {f"eval_{k}": v for k, v in loss.reduce(sums, denoms).items()}
        result["eval_perplexity"] = float(np.exp(min(result["eval_loss"], 50.0)))
        writer.write(step, result)
        log(f"step {step}: eval loss {result['eval_loss']:.4f} (perplexity {result['eval_perplexity']:.2f})")
        return result

    def save(step, state, final):
        meta = {"step": step, "config": config_lib.to_dict(cfg), "tokenizer": data.tokenizer.fingerprint}
        meta["untrained"] = untrained
        meta["skipped_steps"] = counters["skipped_steps"]
        ckpt.save(step, state, loader.get_state(), meta, force=final)

    if t.eval_at_start and start_step == 0 and t.eval_steps:  # the untrained model's loss, for reference
        evaluate(state, 0)
    watcher = preemption.Watcher()  # SIGTERM -> every process saves at one agreed step, then exit 75
    watcher.start(start_step)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), ckpt.on_error():
        state, step, last_eval = loop.run(
            state,
            step_fn=step_fn,
            loader=loader,
            start_step=start_step,
            total_steps=t.steps,
            log_every=t.log_every,
            eval_every=t.eval_every,
            evaluate=evaluate if t.eval_steps else None,  # eval_steps=0: no evaluation
            checkpoint_every=cfg.checkpoint.every,
            save=save,
            writer=writer,
            tokens_per_step=t.batch_size * t.seq_len,
            flops_per_token=flops_per_token,
            peak_flops=peak,
            should_stop=watcher,
            profiler=profiler,
            num_devices=mesh.size,
            on_nonfinite=t.on_nonfinite,
            last_good=ckpt.last_good,
            poll=ckpt.check,
            counters=counters,
        )
        ckpt.close()  # the last save's failure, if any, is reported here
    watcher.close()
    loader.close()
    writer.close()

    preempted = watcher.preempted and step < t.steps
    result = {"step": step, "unigram_entropy": data.unigram_entropy, "preempted": preempted, **last_eval}
    if preempted:
        log(f"preempted: saved step {step} to {ckpt.directory}; run the same command to resume")
        return result
    if last_eval:
        log(f"final eval loss {last_eval['eval_loss']:.4f} nats/token vs unigram entropy {data.unigram_entropy:.4f}")
    if t.sample_prompt and cfg.data.objective == "causal_lm":
        prompt = data.tokenizer.encode(t.sample_prompt)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            ids = generate.greedy(
                graphdef,
                state,
                [data.tokenizer.bos_id] + prompt,
                t.sample_tokens,
                min(model_cfg.max_len, t.seq_len),
                eos_id=data.tokenizer.eos_id,
            )
        sample = t.sample_prompt + data.tokenizer.decode(ids)
        result["sample"] = sample
        if jax.process_index() == 0:
            (checkpoint.epath.Path(workdir) / "sample.txt").write_text(sample)
        log(f"sample:\n{sample}")
    return result


def finished(workdir: str, steps: int) -> int | None:
    """The step of a run in ``workdir`` that already reached ``steps`` (after printing so), else None."""
    latest = checkpoint.latest_step(workdir)
    if latest is None or latest < steps:
        return None
    outputs = [f"checkpoints in {workdir}/checkpoints", f"metrics in {workdir}/metrics.jsonl"]
    if (checkpoint.epath.Path(workdir) / "sample.txt").exists():
        outputs.append(f"its sample in {workdir}/sample.txt")
    log(
        f"podformer: {workdir} is complete (step {latest}, train.steps={steps}): {', '.join(outputs)}; to train "
        f"longer, raise train.steps (e.g. --config.train.steps={2 * latest})"
    )
    return latest


def init_from(path: str, family: str, model_cfg, graphdef, state):
    """``state`` with the model parameters of ``path`` (a podformer workdir or a Hugging Face folder)."""
    src_family, src_cfg, flat = hf.load_params(path)
    diff = params.arch_diff(src_cfg, model_cfg) if src_family == family else [f"family: {src_family} != {family}"]
    if diff:
        raise UserError(
            f"init.checkpoint {path} holds a different model than the run config ({'; '.join(diff[:3])}); "
            "set the run's model.* to the checkpoint's"
        )
    ts = nnx.merge(graphdef, state)
    # Each value lands in the sharding of the parameter it replaces. A checkpoint without some optional
    # part (a base model without its LM head) leaves that part at its fresh initialisation.
    missing = params.set_params(ts.model, flat, allow_missing=True)
    log(f"initialised {len(flat)} parameters from {path}" + (f"; kept fresh: {', '.join(missing)}" if missing else ""))
    return nnx.state(ts), set(missing)


def main() -> None:
    cli.main(run)


if __name__ == "__main__":
    main()
