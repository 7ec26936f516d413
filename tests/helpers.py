"""Shared test helpers: run the entry points as a user would, read what they wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A smaller GPT than configs/gpt.py:tiny (same tokenizer, so the data cache is shared) for fast runs.
SMALL = [
    "--config.model.d_model=64",
    "--config.model.num_layers=2",
    "--config.train.seq_len=64",
    "--config.train.batch_size=16",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.eval_steps=2",
    "--config.train.sample_prompt=",
    "--config.opt.warmup_steps=2",
]


# Tiny test models spend their time compiling, not computing: LLVM's level 0 compiles them twice as fast.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def env(devices: int = 1, *, fast_compile: bool = True, **extra) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast_compile else "")
    e["PODFORMER_NO_PROGRESS"] = "1"
    e["PYTHONPATH"] = REPO
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_cli(
    script: str,
    args: list[str],
    *,
    devices: int = 1,
    cwd: str | None = None,
    timeout: int = 600,
    check: bool = True,
    fast_compile: bool = True,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, script), *args],
        cwd=cwd or REPO,
        env=env(devices, fast_compile=fast_compile),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}
