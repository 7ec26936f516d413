"""What the entry points (train.py, finetune.py) share around their ``run``: bad input exits 2 with one
line, a preempted run exits with preemption.EXIT_CODE so a supervisor restarts it."""

from __future__ import annotations

import sys
from collections.abc import Callable

from podformer import preemption
from podformer.core.errors import UserError


def main(run: Callable[[], dict]) -> None:
    preemption.guard_startup()  # (the scripts install it already before importing JAX; console scripts here)
    try:
        result = run()
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if result.get("preempted"):
        sys.exit(preemption.EXIT_CODE)
