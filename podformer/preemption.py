"""Preemption: on SIGTERM every process agrees on one step, saves a checkpoint there and exits EXIT_CODE.

Multi-process runs use JAX's preemption sync point: the C++ runtime installs its own SIGTERM handler at
``jax.distributed.initialize`` (the preemption service is on by default), spreads the notice to every
process through the coordinator, and picks the first step that no process has reached yet. A single
process without a distributed runtime has no such service; a Python SIGTERM handler stands in for it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". The checkpoint of the step
# the processes agreed on is committed; the same command resumes from it. tpu_scripts/ and the SLURM
# example relaunch on this code.
EXIT_CODE = 75
# After the first signal, further ones are ignored while the checkpoint is written, for this long; a signal
# after it ends the process at once (an unfinished save is never used). Cloud spot VMs give about 30 s.
GRACE_SECONDS = 30.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


_before_guard: dict = {}  # the handlers guard_startup replaced, which Watcher.close puts back
_on_exit: list = []  # what a signal during start-up releases before exiting (the workdir lease)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def at_startup_exit(fn) -> None:
    _on_exit.append(fn)


def forget_startup_exit(fn) -> None:
    if fn in _on_exit:
        _on_exit.remove(fn)


def guard_startup() -> None:
    """Until the loop's Watcher takes over, SIGTERM/SIGINT end the process with EXIT_CODE and one line,
    so a supervisor relaunches a run preempted before its first step (data building, compiling, restoring).
    Nothing is saved because nothing new exists: what start-up writes (caches, the tokenizer folder, metrics
    truncation, moving a damaged checkpoint aside) is written to a temporary name and renamed, so it is whole
    or absent. The exit is immediate (os._exit): no thread of a half-built pipeline can hold it up. Installed
    before jax.distributed.initialize: in a multi-process run JAX's own handler then replaces it."""
    if not _main_thread():
        return
    _before_guard.update({s: signal.getsignal(s) for s in SIGNALS if s not in _before_guard})

    def handler(signum, frame):
        print(
            f"podformer: {signal.Signals(signum).name} during start-up, before the first step: nothing new to "
            "save; rerun the same command to start (or resume) the run",
            file=sys.stderr,
            flush=True,
        )
        for fn in _on_exit:
            try:
                fn()
            except Exception:  # noqa: BLE001, S110 (exiting anyway)
                pass
        os._exit(EXIT_CODE)

    for s in SIGNALS:
        signal.signal(s, handler)


def _jax_sync_manager_active() -> bool:
    from jax._src import distributed as jax_distributed

    g = jax_distributed.global_state
    return g.client is not None and g.preemption_sync_manager is not None


class Watcher:
    """``watcher(step)`` is True at the step to stop at; call it at every step on every process, starting
    with ``start(first_step - 1)`` so a notice that arrives before the first step stops at that step."""

    def __init__(self):
        self.use_jax = _jax_sync_manager_active()
        self.preempted = False
        self._signalled = threading.Event()
        self._first: float | None = None
        self._previous: dict = {}
        # A Python handler would replace JAX's C++ one, so it is installed only where JAX has none. Signal
        # handlers can only be set from the main thread (tests may train in another).
        if not self.use_jax and _main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
            self._previous.update(_before_guard)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._first is None:
            self._first = time.monotonic()
            self._signalled.set()
            return
        waited = time.monotonic() - self._first
        if waited < GRACE_SECONDS:
            print(
                f"podformer: {name} again: ignored while the checkpoint is saved ({waited:.0f} s of "
                f"{GRACE_SECONDS:.0f} s grace)",
                file=sys.stderr,
                flush=True,
            )
            return
        print(
            f"podformer: {name} after the {GRACE_SECONDS:.0f} s grace: exiting without finishing the save "
            "(an unfinished save is never used)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)

    def start(self, step: int) -> None:
        from jax.experimental import multihost_utils

        if self.use_jax:
            multihost_utils.reached_preemption_sync_point(step)

    def __call__(self, step: int) -> bool:
        if self.use_jax:
            from jax.experimental import multihost_utils

            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self._signalled.is_set()
        self.preempted = self.preempted or stop
        return stop

    def close(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}
