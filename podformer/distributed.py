"""Multi-process JAX: initialise when the config or the environment says there is more than one process."""

from __future__ import annotations

import os

import jax


def settings(dist_cfg) -> tuple[str, int, int]:
    coordinator = dist_cfg.coordinator or os.environ.get("PODFORMER_COORDINATOR", "")
    num = dist_cfg.num_processes or int(os.environ.get("PODFORMER_NUM_PROCESSES", "0") or 0)
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else int(os.environ.get("PODFORMER_PROCESS_ID", "-1"))
    return coordinator, num, pid


def initialize(dist_cfg) -> None:
    coordinator, num, pid = settings(dist_cfg)
    if num > 1:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
