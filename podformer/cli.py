"""What the entry points (train.py, finetune.py) share around their ``run``: ``--help`` and config errors
answered before JAX loads, bad input exits 2 with one line, a preempted run exits with
preemption.EXIT_CODE so a supervisor restarts it. JAX-free: the entries read it before importing JAX."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from typing import Any

from podformer import config as config_lib
from podformer import preemption
from podformer.core.errors import UserError


def first_contact(argv: list[str], default_config: str, flags: dict[str, Any]) -> None:
    """Parse the command line as the entry will, before it imports JAX: ``--help`` prints the chosen config's
    sections and keys and exits 0, a config error prints one line and exits 2, in a second or two."""
    try:
        config_lib.parse_args(argv, default_config, flags)
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(run: Callable[[], dict]) -> None:
    preemption.guard_startup()  # (the scripts install it already before importing JAX; console scripts here)
    try:
        result = run()
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if result.get("preempted"):
        sys.exit(preemption.EXIT_CODE)


def train() -> None:
    """The ``podformer-train`` console script: podformer.train run as ``python train.py`` runs it."""
    runpy.run_module("podformer.train", run_name="__main__", alter_sys=True)


def finetune() -> None:
    """The ``podformer-finetune`` console script."""
    runpy.run_module("podformer.finetune", run_name="__main__", alter_sys=True)
