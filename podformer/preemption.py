"""Preemption: on SIGTERM every process agrees on one step, saves a checkpoint there and exits EXIT_CODE.

Multi-process runs use JAX's preemption sync point: the C++ runtime installs its own SIGTERM handler at
``jax.distributed.initialize`` (the preemption service is on by default), spreads the notice to every
process through the coordinator, and picks the first step that no process has reached yet. A single
process without a distributed runtime has no such service; a Python SIGTERM handler stands in for it.
"""

from __future__ import annotations

import signal
import threading

from jax.experimental import multihost_utils

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". The checkpoint of the step
# the processes agreed on is committed; the same command resumes from it. tpu_scripts/ and the SLURM
# example relaunch on this code.
EXIT_CODE = 75


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
        self._previous = None
        # A Python handler would replace JAX's C++ one, so it is installed only where JAX has none. Signal
        # handlers can only be set from the main thread (tests may train in another).
        if not self.use_jax and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled.set()

    def start(self, step: int) -> None:
        if self.use_jax:
            multihost_utils.reached_preemption_sync_point(step)

    def __call__(self, step: int) -> bool:
        if self.use_jax:
            stop = multihost_utils.reached_preemption_sync_point(step)
        else:
            stop = self._signalled.is_set()
        self.preempted = self.preempted or stop
        return stop

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
