"""The default run: `python train.py` with no flags, as a new user runs it. Its own file, so the test
runner starts it first (it is the longest test) while the other files run beside it."""

import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers import env, read_metrics, run_cli


@pytest.mark.slow
def test_default_run(tmp_path):
    """`python train.py` with no flags: under 10 minutes here, validation loss well below the corpus'
    unigram entropy, and it leaves checkpoints, metrics, TensorBoard events and a sample; run again, it
    says the run is complete."""
    t0 = time.time()
    proc = run_cli("train.py", [], cwd=str(tmp_path), timeout=900, fast_compile=False)  # as a user runs it
    elapsed = time.time() - t0
    print(proc.stdout)
    assert elapsed < 600, elapsed
    m = re.search(r"final eval loss ([\d.]+) nats/token vs unigram entropy ([\d.]+)", proc.stdout)
    assert m, proc.stdout
    eval_loss, entropy = float(m.group(1)), float(m.group(2))
    assert eval_loss < entropy - 1.5, (eval_loss, entropy)
    workdir = tmp_path / "runs" / "gpt_tiny"
    assert (workdir / "checkpoints" / "400").is_dir()
    metrics = read_metrics(str(workdir))
    train_lines = [x for x in metrics if "loss" in x]
    assert {"step", "loss", "learning_rate", "tokens_per_sec", "mfu"} <= set(train_lines[-1])
    assert any("eval_loss" in x for x in metrics)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert len((workdir / "sample.txt").read_text()) > len("def") + 10
    assert (workdir / "curves.png").stat().st_size > 20_000  # drawn at each eval and at the end (test_look)
    # The generate command on the run: its greedy continuation of the sample's prompt is sample.txt.
    command = [
        sys.executable,
        "-m",
        "podformer.generate",
        "--model=runs/gpt_tiny",
        "--prompt=def",
        "--max_new_tokens=48",
    ]
    generated = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout == (workdir / "sample.txt").read_text() + "\n"
    again = run_cli("train.py", [], cwd=str(tmp_path), timeout=300)  # finished: one line, nothing recompiled
    assert again.stdout.startswith(f"podformer: {workdir} is complete (step 400") and again.stdout.count("\n") == 1
