"""Pretraining entry point: flags -> config -> mesh -> state -> data -> loop.

python train.py                                         # configs/gpt.py:tiny on the embedded corpus, CPU
python train.py --config=configs/gpt.py:gpt2_small --config.mesh.fsdp=8 --workdir=gs://bucket/run
python train.py --workdir=runs/gpt_tiny                 # again: resumes from the latest checkpoint
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from flax import nnx

from podformer import (
    checkpoint,
    cli,
    distillation,
    distributed,
    generate,
    hostmem,
    loop,
    optim,
    preemption,
    profiling,
    trainer,
)
from podformer import config as config_lib
from podformer import flops as flops_lib
from podformer import mesh as mesh_lib
from podformer.core.errors import UserError
from podformer.data import hf_tokenizer, pipeline
from podformer.data.loader import Loader
from podformer.losses import LOSSES
from podformer.metrics import MetricWriter, log

DEFAULT_CONFIG = "configs/gpt.py:tiny"
# --compile_only=v5p:2x2x2 (or a named slice, v5p-64): compile the train step for that TPU topology on
# this machine, print its per-device memory and whether it fits in HBM, and stop (podformer/aot.py).
FLAGS = {"workdir": "", "compile_only": ""}


def run(argv: list[str] | None = None) -> dict:
    cfg, flags = config_lib.parse_args(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG, FLAGS)
    hostmem.keep_freed_memory()  # before JAX starts its threads; CPU runs only (podformer/hostmem.py)
    distributed.initialize(cfg.distributed)
    workdir = flags["workdir"] or os.path.join("runs", cfg.name)
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)  # Orbax needs absolute paths
    if not flags["compile_only"]:  # compile-only writes nothing, not even a workdir
        checkpoint.check_workdir(workdir)
    profiler = profiling.Profiler(cfg.profile, workdir)  # validates profile.steps before any work
    done = None if flags["compile_only"] else finished(workdir, cfg.train.steps)
    if done is not None:  # nothing to train: say so before any data is built or anything compiled
        return {"step": done, "complete": True, "preempted": False}

    from podformer import model as models  # after distributed init: nothing may touch devices before it

    if cfg.model.family not in models.FAMILIES:
        raise UserError(f"model.family={cfg.model.family!r}; choose one of {', '.join(models.FAMILIES)}")
    config_cls, module_cls = models.FAMILIES[cfg.model.family]
    model_cfg = config_lib.family_config(cfg.model, config_cls)
    t = cfg.train
    if (
        hasattr(model_cfg, "max_len")
        and getattr(model_cfg, "position", "learned") == "learned"
        and t.seq_len > model_cfg.max_len
    ):
        raise UserError(
            f"train.seq_len={t.seq_len} exceeds model.max_len={model_cfg.max_len}; lower one or raise the other"
        )

    teacher = distillation.load(cfg, model_cfg) if cfg.data.objective == "distill" else None
    make_teacher = teacher.make if teacher is not None else None

    if flags["compile_only"]:
        from podformer import aot

        return aot.compile_only(flags["compile_only"], cfg, model_cfg, module_cls)

    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(mesh, t.batch_size, t.grad_accum)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    log(
        f"podformer: {cfg.config_spec} -> {workdir}; mesh {dict(mesh.shape)} over {mesh.size} "
        f"{jax.devices()[0].platform} devices, {jax.process_count()} process(es)"
    )

    def make_model(rngs):
        return module_cls(model_cfg, rngs=rngs)

    # The state's layout, from shapes alone, before the data: what the mesh cannot shard is reported (or,
    # with mesh.strict, refused) in seconds, not after a tokenizer has been trained.
    tx = optim.make_optimizer(cfg.opt, t.steps)
    schedule = optim.schedule(cfg.opt, t.steps)
    graphdef, abstract = trainer.abstract_state(make_model, tx, t.seed, make_teacher)
    shardings = trainer.state_shardings(abstract, mesh, rules, strict=cfg.mesh.strict)

    data = pipeline.build(cfg.data, vocab_size=model_cfg.vocab_size, seq_len=t.seq_len)
    log(f"data: {data.description}; unigram entropy {data.unigram_entropy:.3f} nats/token")
    if jax.process_index() == 0:  # the tokenizer travels with the model: resume, fine-tune and export read it
        hf_tokenizer.keep(data.tokenizer, os.path.join(workdir, "tokenizer"))
    ckpt = checkpoint.Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    writer = MetricWriter(workdir)

    # Resume order: the latest complete checkpoint in this workdir -> init.checkpoint (parameters only, from a
    # podformer workdir or a Hugging Face folder; the optimizer starts fresh) -> from scratch.
    start_step, data_state = 0, None
    fresh = None  # the parameters never imported nor trained (None: all of them)
    latest = ckpt.latest_step()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        if latest is not None:
            meta = ckpt.restore_meta(latest)
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
            writer.truncate_after(latest)
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

    loss = teacher.loss if teacher is not None else LOSSES[cfg.data.objective]
    step_fn, batch_shard = trainer.compile_train_step(
        graphdef, abstract, shardings, loader.host_batch(0), loss=loss, train_cfg=t, mesh=mesh, rules=rules,
        schedule=schedule,
    )  # fmt: skip
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        eval_fn = trainer.jit_eval_step(graphdef, shardings, batch_shard, loss=loss)
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
        ckpt.save(step, state, loader.get_state(), meta, force=final)

    if t.eval_at_start and start_step == 0 and t.eval_steps:  # the untrained model's loss, for reference
        evaluate(state, 0)
    watcher = preemption.Watcher()  # SIGTERM -> every process saves at one agreed step, then exit 75
    watcher.start(start_step)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
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
        )
    watcher.close()
    ckpt.close()
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
    from podformer.model import hf, params

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
