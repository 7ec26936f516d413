"""Fine-tuning entry point: flags -> config -> task -> model + head -> the shared training loop -> eval.

python finetune.py      # = --config=configs/finetune/embedded.py:tiny: the default train.py run's GPT classifies
                        #   stdlib snippets by package; prints the test accuracy next to the majority baseline
python finetune.py --config=configs/finetune/glue.py:bert_base --config.init.checkpoint=~/models/bert-base-uncased \
    --config.task.source=tfds:glue/mrpc --workdir=runs/mrpc
python finetune.py --config=configs/finetune/glue.py:bert_base --workdir=runs/mrpc --config.mode=eval     # score it
python finetune.py --config=configs/finetune/glue.py:bert_base --workdir=runs/mrpc --config.mode=predict  # write
"""

from __future__ import annotations

import sys

from podformer import cli, preemption

DEFAULT_CONFIG = "configs/finetune/embedded.py:tiny"
FLAGS = {"workdir": ""}
MODES = ("train", "eval", "predict")

if __name__ == "__main__":  # --help and config errors answer before JAX loads (it takes seconds), and a
    # signal while JAX loads already exits 75 (podformer/preemption.py)
    preemption.guard_startup()
    cli.first_contact(sys.argv[1:], DEFAULT_CONFIG, FLAGS)

import json  # noqa: E402  (the imports after the first-contact check)
import math  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from podformer import (  # noqa: E402
    checkpoint,
    distributed,
    finetuning,
    hostmem,
    loop,
    optim,
    profiling,
    trainer,
    workdir_lock,
)
from podformer import config as config_lib  # noqa: E402
from podformer import finetune_tasks as tasks  # noqa: E402
from podformer import flops as flops_lib  # noqa: E402
from podformer import mesh as mesh_lib  # noqa: E402
from podformer.core.errors import UserError  # noqa: E402
from podformer.data.loader import Loader  # noqa: E402
from podformer.data.tasks import features  # noqa: E402
from podformer.finetune_eval import Evaluator  # noqa: E402
from podformer.metrics import MetricWriter, log  # noqa: E402
from podformer.model import families, heads, params  # noqa: E402


def run(argv: list[str] | None = None) -> dict:
    cfg, flags = config_lib.parse_args(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG, FLAGS)
    hostmem.keep_freed_memory()
    distributed.initialize(cfg.distributed)
    if cfg.mode not in MODES:
        raise UserError(f"mode={cfg.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.checkpoint.every:
        raise UserError("finetune.py checkpoints at every evaluation (train.eval_every); leave checkpoint.every=0")
    workdir = flags["workdir"] or os.path.join("runs", cfg.name)
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)
    checkpoint.check_workdir(workdir)
    with workdir_lock.hold(workdir):  # one writer per workdir
        return _run(cfg, workdir)


def _run(cfg, workdir: str) -> dict:
    profiler = profiling.Profiler(cfg.profile, workdir)

    task = tasks.make_task(cfg.task, label_names=[])  # label names come later: they may need the data
    ckpt = checkpoint.Checkpointer(
        workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, best=(task.metric, task.mode)
    )
    # Resume order: the latest checkpoint of this workdir (model, head, optimizer, data position) ->
    # init.checkpoint (backbone parameters only; fresh head and optimizer) -> a fresh model.
    latest = ckpt.latest_step()
    meta = ckpt.restore_meta(latest) if latest is not None else None
    if meta is not None and (meta.get("params_only") or "label_names" not in meta):
        raise UserError(
            f"{workdir} holds a checkpoint that is not a fine-tuning run; pass it as "
            f"--config.init.checkpoint={workdir} and fine-tune into a new --workdir"
        )
    if cfg.mode != "train" and meta is None:
        raise UserError(f"mode={cfg.mode} needs a fine-tuned --workdir; {workdir} has no checkpoint (train first)")
    if cfg.mode == "train" and meta is not None and finished(workdir, cfg, meta, task.metric):
        return {"workdir": workdir, "step": latest, "complete": True, "preempted": False}
    start = finetuning.resolve_start(cfg, config_lib, meta["model"] if meta else None)
    finetuning.check_family(task.type, start.family, f"init.checkpoint {start.description}")
    model_cfg, family = start.model_cfg, start.family
    row = families.get(family)
    tok = finetuning.resolve_tokenizer(cfg, start, workdir, resumed=meta is not None)
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {model_cfg.vocab_size}; set data.tokenizer "
            "to the model's tokenizer"
        )
    if meta is not None and meta.get("tokenizer") != tok.fingerprint:
        raise UserError(f"{workdir} was fine-tuned with tokenizer {meta.get('tokenizer')}, not {tok.fingerprint}")
    task.label_names = meta["label_names"] if meta is not None else tasks.label_names(task)
    lay = features.layout(
        row.framing, row.kind, tok, what=family, type_vocab_size=getattr(model_cfg, "type_vocab_size", 0)
    )
    t = cfg.train
    seq_len = t.seq_len
    if getattr(model_cfg, "position", "learned") == "learned" and seq_len > model_cfg.max_len:
        raise UserError(f"train.seq_len={seq_len} exceeds the model's max_len={model_cfg.max_len}; lower it")

    if int(cfg.mesh.get("stage", 1)) > 1:  # the pipeline schedule is pretraining's (train.py) only
        raise UserError(f"mesh.stage={cfg.mesh.stage}: finetune.py runs without pipeline stages; use mesh.fsdp/tensor")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(mesh, t.batch_size, t.grad_accum)
    mesh_lib.check_batch(mesh, t.eval_batch_size, 1)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    log(f"podformer: {cfg.config_spec} ({cfg.mode}) -> {workdir}; model {family} from {start.description}")

    train_rows = None
    if cfg.mode == "train":
        train_examples = task.read(cfg.task.train_split, cfg.task.max_train_examples)
        task.read(cfg.task.validation_split, cfg.task.max_eval_examples)  # its errors before any compilation
        train_rows = tasks.rows(task, train_examples, tok, lay, seq_len, training=True)
        n_train = len(train_rows["label_weights" if "label_weights" in train_rows else next(iter(train_rows))])
        log(f"task: {task.type} on {cfg.task.source}: {len(train_examples)} train examples ({n_train} rows)")
    steps = t.steps
    if t.epochs > 0 and train_rows is not None:
        steps = max(1, math.ceil(t.epochs * n_train / t.batch_size))
    elif meta is not None and t.epochs > 0:
        steps = meta["total_steps"]

    head_kind = finetuning.HEAD_OF[task.type]
    dropout = cfg.head.dropout if cfg.head.dropout >= 0 else getattr(model_cfg, "dropout", 0.0)
    module_cls = row.module_class()

    def make_model(rngs):
        backbone = module_cls(model_cfg, rngs=rngs)
        return heads.FineTuneModel(backbone, family, head_kind, task.num_outputs, dropout=dropout, rngs=rngs)

    depth = max(getattr(model_cfg, "num_layers", 0), getattr(model_cfg, "decoder_layers", 0))
    factor = finetuning.layer_decay(cfg.opt.layer_decay, depth) if cfg.opt.layer_decay != 1.0 else None
    tx = optim.make_optimizer(cfg.opt, steps, lr_factor=factor)
    graphdef, abstract = trainer.abstract_state(make_model, tx, t.seed)
    shardings = trainer.state_shardings(abstract, mesh, rules, strict=cfg.mesh.strict)
    # A finished run resumes only when asked for more steps than it ran (see finished()).
    resume = cfg.mode == "train" and meta is not None and (not meta.get("done") or steps > meta["total_steps"])
    restore_step = latest if resume or meta is None else (ckpt.best_step() or latest)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        if meta is not None:
            state, data_state, meta = ckpt.restore(restore_step, trainer.with_shardings(abstract, shardings))
            log(f"restored step {restore_step} from {ckpt.directory}")
        else:
            _, state, _ = trainer.create_state(make_model, tx, mesh, rules, t.seed)
            data_state = None
            if start.flat is not None:
                ts = nnx.merge(graphdef, state)
                missing = params.set_params(ts.model.backbone, start.flat, allow_missing=True)
                state = nnx.state(ts)
                log(f"initialised {len(start.flat)} backbone parameters from {start.description}; head fresh")
                if missing:
                    log(f"kept fresh (absent from the checkpoint): {', '.join(missing)}")
    finetuning.save_tokenizer(tok, workdir)

    evaluator = Evaluator(
        task, tok, lay, graphdef, shardings, mesh, rules, seq_len=seq_len, batch_size=t.eval_batch_size
    )
    writer = MetricWriter(workdir)
    result: dict = {"workdir": workdir}
    if cfg.mode == "train" and (meta is None or resume):
        state, stopped = _train(cfg, task, evaluator, ckpt, writer, profiler, state, graphdef, shardings, mesh, rules,
                                train_rows, steps, restore_step if meta else 0, data_state, model_cfg, family, tok,
                                start)  # fmt: skip
        result.update(stopped)
        if stopped.get("preempted"):
            ckpt.close()
            writer.close()
            return result
        best = ckpt.best_step()
        if best is not None and best != stopped["step"]:
            state, _, _ = ckpt.restore(best, trainer.with_shardings(abstract, shardings))
        log(f"best checkpoint: step {best} by {task.metric}")
        result["best_step"] = best
    ckpt.close()

    splits = [cfg.task.validation_split] + ([cfg.task.test_split] if cfg.task.test_split else [])
    if cfg.mode == "predict":
        splits = [cfg.task.predict_split]
    train_labels = None
    for split in splits:
        examples = task.read(split, cfg.task.max_eval_examples)
        metrics, records = evaluator.evaluate(state, examples)
        result[split] = metrics
        if metrics:
            log(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int)))
        if task.type in ("classification", "regression") and metrics and cfg.mode != "predict":
            train_labels = train_labels or [ex["label"] for ex in task.read(cfg.task.train_split)]
            baseline = tasks.baseline(task, train_labels, examples)
            result[f"{split}_baseline"] = baseline
            name = "majority-class" if task.type == "classification" else "train-mean"
            log(f"{split} {task.metric} {metrics[task.metric]:.4f} vs {name} baseline {baseline[task.metric]:.4f}")
        if split == (cfg.task.predict_split if cfg.mode != "eval" else None) and jax.process_index() == 0:
            path = os.path.join(workdir, "predictions.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            log(f"wrote {len(records)} predictions of the {split} split to {path}")
    writer.close()
    return result


def finished(workdir: str, cfg, meta: dict, metric: str) -> bool:
    """Whether the fine-tuning run in ``workdir`` is done and this config asks for no longer a run (after
    printing so); a raised train.steps or train.epochs trains on from the latest checkpoint."""
    ran = meta.get("config", {}).get("train", {})
    if not meta.get("done") or (cfg.train.steps, cfg.train.epochs) != (ran.get("steps"), ran.get("epochs")):
        return False
    best = (meta.get("best") or {}).get("value")
    best = f"{best:.4f}" if isinstance(best, float | int) else best
    length = "train.epochs" if cfg.train.epochs > 0 else "train.steps"
    log(
        f"podformer: {workdir} is complete (step {meta['step']} of {meta['total_steps']}; best {metric} {best}): "
        f"checkpoints in {workdir}/checkpoints, metrics in {workdir}/metrics.jsonl; score or predict with "
        f"--config.mode=eval|predict, or raise {length} to train longer"
    )
    return True


def _train(cfg, task, evaluator, ckpt, writer, profiler, state, graphdef, shardings, mesh, rules, train_rows, steps,
           start_step, data_state, model_cfg, family, tok, start) -> tuple:  # fmt: skip
    """The loop: train steps, evaluation (and a checkpoint carrying the task metric) every eval_every steps
    and at the end, early stopping, preemption. Returns (state, {"step", "preempted", "early_stopped"})."""
    t = cfg.train
    model_keys = {k: v for k, v in train_rows.items() if k not in tasks.MODEL_KEYS_DROPPED}
    loader = Loader(features.Rows(model_keys), global_batch=t.batch_size, mesh=mesh, rules=rules, seed=t.seed)
    if data_state is not None:
        loader.set_state(data_state)
    # One line per step: what a killed run logged after its checkpoint (or with none) is about to be redone.
    writer.truncate_after(start_step if start_step else -1)
    step_fn, _ = trainer.compile_train_step(
        graphdef, state, shardings, loader.host_batch(0), loss=finetuning.TASK_LOSSES[task.type], train_cfg=t,
        mesh=mesh, rules=rules, schedule=optim.schedule(cfg.opt, steps),
    )  # fmt: skip
    sizes = {k: int(np.prod(s)) for k, s in trainer.named_param_shapes(state).items()}
    flops_per_token = flops_lib.per_token(model_cfg, sizes, t.seq_len, flops_lib.decoder_len(loader.host_batch(0)))
    peak, _ = flops_lib.peak_per_device(cfg.metrics.peak_tflops)
    log(f"model: {trainer.param_summary(graphdef, state, model_cfg)}; {steps} steps of {t.batch_size}")

    saved = ckpt.restore_meta(start_step) if start_step else {}
    best = dict(saved.get("best") or {})
    counters = {"skipped_steps": saved.get("skipped_steps", 0)}
    best.setdefault("value", None)
    best.setdefault("stale", 0)
    evaluated: dict[int, dict] = {}
    early = {"stop": False}

    def evaluate(state, step):
        if step not in evaluated:
            validation = task.read(cfg.task.validation_split, cfg.task.max_eval_examples)
            metrics, _ = evaluator.evaluate(state, validation)
            if task.metric not in metrics:
                raise UserError(f"task.metric={task.metric!r} is not among this task's metrics: {', '.join(metrics)}")
            value = metrics[task.metric]
            better = best["value"] is None or (value > best["value"] if task.mode == "max" else value < best["value"])
            best.update(value=value if better else best["value"], stale=0 if better else best["stale"] + 1)
            early["stop"] = bool(t.early_stopping) and best["stale"] >= t.early_stopping
            writer.write(step, {f"eval_{k}": v for k, v in metrics.items()})
            log(f"step {step}: eval {task.metric} {value:.4f} (best {best['value']:.4f})")
            evaluated[step] = metrics
        return evaluated[step]

    def save(step, state, final):
        stopped = watcher.preempted or early["stop"]
        # The best-checkpoint rule needs the metric at save time: the final step is evaluated here, before
        # the loop's own end-of-run evaluation (which then reads this result).
        metrics = evaluated.get(step) or (None if stopped else evaluate(state, step))
        meta = {
            "step": step,
            "config": config_lib.to_dict(cfg),
            "model": params.config_to_dict(family, model_cfg),
            "tokenizer": tok.fingerprint,
            "label_names": task.label_names,
            "total_steps": steps,
            "best": dict(best),
            "done": step == steps or early["stop"],
            "skipped_steps": counters["skipped_steps"],
        }
        ckpt.save(
            step, state, loader.get_state(), meta, force=final, metrics=metrics and {task.metric: metrics[task.metric]}
        )

    watcher = preemption.Watcher()
    watcher.start(start_step)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), ckpt.on_error():
        state, step, _ = loop.run(
            state,
            step_fn=step_fn,
            loader=loader,
            start_step=start_step,
            total_steps=steps,
            log_every=t.log_every,
            eval_every=t.eval_every,
            evaluate=evaluate,
            checkpoint_every=t.eval_every or steps,
            save=save,
            writer=writer,
            tokens_per_step=t.batch_size * t.seq_len,
            flops_per_token=flops_per_token,
            peak_flops=peak,
            should_stop=lambda s: watcher(s) or early["stop"],
            profiler=profiler,
            num_devices=mesh.size,
            on_nonfinite=t.on_nonfinite,
            last_good=ckpt.last_good,
            poll=ckpt.check,
            counters=counters,
        )
        ckpt.wait()  # the last save's failure, if any, is reported here
    watcher.close()
    loader.close()
    preempted = watcher.preempted and step < steps
    if preempted:
        log(f"preempted: saved step {step} to {ckpt.directory}; run the same command to resume")
    if early["stop"]:
        log(f"early stopping at step {step}: {t.early_stopping} evaluations without a better {task.metric}")
    return state, {"step": step, "preempted": preempted, "early_stopped": early["stop"]}


def main() -> None:
    cli.main(run)


if __name__ == "__main__":
    main()
