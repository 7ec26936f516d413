"""The training loop shared by train.py and finetune.py: dispatch, metrics, eval and checkpoint triggers."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from podformer import flops as flops_lib
from podformer.core.errors import UserError
from podformer.metrics import MetricWriter, Progress


def run(
    state,
    *,
    step_fn: Callable,
    loader,
    start_step: int,
    total_steps: int,
    log_every: int,
    eval_every: int,
    evaluate: Callable[[object, int], dict] | None,
    checkpoint_every: int,
    save: Callable[[int, object, bool], None],
    writer: MetricWriter,
    tokens_per_step: int,
    flops_per_token: float,
    peak_flops: float,
    should_stop: Callable[[int], bool] = lambda step: False,
    profiler=None,
    num_devices: int | None = None,
    on_nonfinite: str = "stop",
    last_good: Callable[[], str] = lambda: "",
    poll: Callable[[], None] | None = None,
    counters: dict | None = None,
):
    """Run steps ``start_step+1 .. total_steps``. Returns (state, last step, last eval metrics).

    Step N's metrics are fetched after step N+1 is dispatched, so the host never waits for the device
    except at logging points. ``should_stop(step)`` (e.g. preemption) ends the loop after a save.

    A step whose loss or gradient norm is not finite (the step's ``nonfinite`` metric) raises a UserError
    naming ``last_good()`` with ``on_nonfinite='stop'``; every save first fetches the metrics of the step
    it saves, so a non-finite state is never saved. With 'skip' the step's update was not applied (the
    train step keeps the previous state) and ``counters['skipped_steps']`` counts it. ``poll()`` runs
    every step (a failed background save raises there)."""
    num_devices = num_devices or jax.device_count()  # the mesh's, for MFU
    counters = {} if counters is None else counters
    counters.setdefault("skipped_steps", 0)
    progress = Progress(total_steps, start_step)
    pending: list[tuple[int, dict]] = []
    window: list[dict] = []
    t_window, steps_in_window = time.perf_counter(), 0
    last_eval: dict = {}

    def flush(final: bool = False, drain: bool = False):
        """Fetch every step's metrics but the newest (all with ``final`` or ``drain``); log at log steps
        (and what is left with ``final``)."""
        nonlocal t_window, steps_in_window
        while pending and (final or drain or len(pending) > 1):
            step, m = pending.pop(0)
            w = {k: float(np.asarray(v)) for k, v in jax.device_get(m).items()}
            if w.pop("nonfinite", 0.0):
                if on_nonfinite != "skip":
                    raise UserError(
                        f"step {step}: loss is {w.get('loss')} (gradient norm {w.get('grad_norm')}); "
                        f"{last_good()} and no non-finite state was saved; lower opt.lr, raise "
                        "opt.warmup_steps or set opt.clip_norm, then rerun, or set train.on_nonfinite=skip "
                        "to skip such steps"
                    )
                counters["skipped_steps"] += 1
                w["skipped"] = 1.0
            window.append(w)
            if step % log_every == 0 or step == total_steps or (final and window):
                now = time.perf_counter()
                tps = tokens_per_step * steps_in_window / max(now - t_window, 1e-9)
                # A skipped step's loss is not finite: the logged means are over the applied steps.
                kept = [w for w in window if not w.get("skipped")] or window
                values = {k: float(np.mean([w[k] for w in kept])) for k in kept[0] if k != "skipped"}
                values["learning_rate"] = window[-1]["learning_rate"]
                if on_nonfinite == "skip":
                    values["skipped_steps"] = counters["skipped_steps"]
                values.update(
                    tokens_per_sec=tps,
                    step_time=(now - t_window) / max(steps_in_window, 1),
                    mfu=flops_lib.mfu(tps, flops_per_token, peak_flops, num_devices),
                )
                writer.write(step, values)
                progress.update(0, loss=f"{values['loss']:.3f}", tok_s=f"{tps:,.0f}")
                window.clear()
                t_window, steps_in_window = now, 0

    step = start_step
    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = next(loader)
            if profiler is not None:
                profiler.before_step(step)
            state, metrics = step_fn(state, batch)
            if profiler is not None:
                profiler.after_step(step, metrics)
            pending.append((step, metrics))
            steps_in_window += 1
            flush()
            if poll is not None:
                poll()
            progress.update(1)
            stop = should_stop(step)
            # A preempted run spends its grace period on the checkpoint, not on an evaluation.
            if evaluate is not None and eval_every and step % eval_every == 0 and step != total_steps and not stop:
                flush(final=True)
                last_eval = evaluate(state, step)
            if step % checkpoint_every == 0 or step == total_steps or stop:
                flush(drain=True)  # the saved step's metrics are checked first (the save syncs anyway)
                save(step, state, stop or step == total_steps)
            if stop:
                break
        flush(final=True)
        if evaluate is not None and step == total_steps and step > start_step:
            last_eval = evaluate(state, step)
    finally:
        progress.close()
        if profiler is not None:
            profiler.close()
    return state, step, last_eval
