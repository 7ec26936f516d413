"""Metrics to ``<workdir>/metrics.jsonl`` and TensorBoard, from process 0 only; a progress bar."""

from __future__ import annotations

import json
import os
import sys

import jax
from etils import epath

from podformer import plot


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        # Object stores (gs://) have no append: there the lines are kept and the whole object rewritten.
        self._remote = "://" in str(workdir)
        self._lines: list[str] | None = None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """At start: drop lines a killed run wrote after the step this run starts from (-1: all of them),
        so the file stays one line per step (they are about to be recomputed, identically). A line cut off
        by the kill is dropped too. The file is replaced whole (a kill here leaves the old or the new one)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for ln in self.path.read_text().splitlines():
            try:
                record = json.loads(ln)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(ln + "\n")
        tmp = self.path.parent / (self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
        self._lines = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        if self._remote:
            if self._lines is None:
                self._lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line)
        for k, v in record.items():
            if k != "step" and isinstance(v, int | float):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if any(k.startswith("eval_") for k in record):  # curves.png is redrawn at each evaluation
            self.draw()

    def draw(self) -> None:
        """<workdir>/curves.png from metrics.jsonl (podformer/plot.py)."""
        if not self.enabled or not self.path.exists():
            return
        try:
            plot.curves(str(self.path.parent))
        except Exception as e:  # a picture that cannot be drawn must not stop training; say why
            print(f"podformer: warning: could not draw {self.path.parent}/curves.png ({type(e).__name__}: {e})",
                  file=sys.stderr)  # fmt: skip

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self.draw()


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


class Progress:
    """A tqdm bar on process 0 (stderr); silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool | None = None):
        self.bar = None
        if jax.process_index() == 0 if enabled is None else enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                disable=os.environ.get("PODFORMER_NO_PROGRESS") == "1",
            )

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log(*args) -> None:
    """print() on process 0 only."""
    if jax.process_index() == 0:
        print(*args, flush=True)
