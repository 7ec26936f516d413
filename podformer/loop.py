"""The training loop shared by train.py and finetune.py: dispatch, metrics, eval and checkpoint triggers."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from podformer import flops as flops_lib
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
):
    """Run steps ``start_step+1 .. total_steps``. Returns (state, last step, last eval metrics).

    Step N's metrics are fetched after step N+1 is dispatched, so the host never waits for the device
    except at logging points. ``should_stop(step)`` (e.g. preemption) ends the loop after a save."""
    num_devices = num_devices or jax.device_count()  # the mesh's, for MFU
    progress = Progress(total_steps, start_step)
    pending: list[tuple[int, dict]] = []
    window: list[dict] = []
    t_window, steps_in_window = time.perf_counter(), 0
    last_eval: dict = {}

    def flush(final: bool = False):
        nonlocal t_window, steps_in_window
        while pending and (final or len(pending) > 1):
            step, m = pending.pop(0)
            window.append({k: float(np.asarray(v)) for k, v in jax.device_get(m).items()})
            if step % log_every == 0 or step == total_steps or (final and window):
                now = time.perf_counter()
                tps = tokens_per_step * steps_in_window / max(now - t_window, 1e-9)
                values = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                values["learning_rate"] = window[-1]["learning_rate"]
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
            progress.update(1)
            stop = should_stop(step)
            # A preempted run spends its grace period on the checkpoint, not on an evaluation.
            if evaluate is not None and eval_every and step % eval_every == 0 and step != total_steps and not stop:
                flush(final=True)
                last_eval = evaluate(state, step)
            if step % checkpoint_every == 0 or step == total_steps or stop:
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
