"""``--config.profile.steps=10-12``: a JAX profiler trace of those train steps in ``<workdir>/profile``.

The trace (``plugins/profile/<run>/*.xplane.pb`` and ``*.trace.json.gz``) opens in TensorBoard's
profile plugin, XProf or Perfetto. Step N is traced from its dispatch until its results are ready;
tracing several consecutive steps shows how the host's dispatch overlaps the device.
"""

from __future__ import annotations

import os

import jax

from podformer.core.errors import UserError
from podformer.metrics import log


def parse_steps(spec: str) -> list[tuple[int, int]]:
    """'' -> []; '5' -> [(5, 5)]; '10-12,50-51' -> [(10, 12), (50, 51)] (inclusive ranges)."""
    ranges = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"profile.steps={spec!r}: expected steps like 10-12 or 5 or 10-12,50-51") from None
        if first < 1 or last < first:
            raise UserError(f"profile.steps={spec!r}: {part} is not a range of steps >= 1")
        ranges.append((first, last))
    return sorted(ranges)


class Profiler:
    """Starts a trace before the first step of each range and stops it once the last step has run."""

    def __init__(self, profile_cfg, workdir: str):
        self.ranges = parse_steps(profile_cfg.steps)
        self.directory = os.path.join(workdir, "profile") if "://" not in workdir else f"{workdir}/profile"
        self.active = False

    def before_step(self, step: int) -> None:
        if not self.active and any(first == step for first, _ in self.ranges):
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, outputs) -> None:
        if self.active and any(last == step for _, last in self.ranges):
            jax.block_until_ready(outputs)  # the trace must contain the device work, not just the dispatch
            jax.profiler.stop_trace()
            self.active = False
            log(f"profile of steps up to {step} written to {self.directory}")

    def close(self) -> None:
        if self.active:  # the run ended inside a range
            jax.profiler.stop_trace()
            self.active = False
