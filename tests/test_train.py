"""End to end: sharded == unsharded, exact resume after SIGKILL, gradient accumulation, the default run."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from podformer import train
from tests.helpers import REPO, SMALL, env, run_cli, train_losses

STEPS5 = [*SMALL, "--config.train.steps=5", "--config.checkpoint.every=100"]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    run_cli("train.py", [*STEPS5, f"--workdir={workdir}"], devices=1)
    return train_losses(str(workdir))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2), (2, 1, 4)])
def test_sharded_losses_equal_one_device(mesh, one_device_losses, tmp_path):
    d, f, t = mesh
    train.run(
        [
            *STEPS5,
            f"--config.mesh.data={d}",
            f"--config.mesh.fsdp={f}",
            f"--config.mesh.tensor={t}",
            f"--workdir={tmp_path}",
        ]
    )
    losses = train_losses(str(tmp_path))
    assert sorted(losses) == [1, 2, 3, 4, 5]
    for step, loss in losses.items():
        assert abs(loss - one_device_losses[step]) <= 1e-5 * abs(one_device_losses[step]), (step, loss)


def test_gradient_accumulation_matches_the_full_batch(one_device_losses, tmp_path):
    run_cli("train.py", [*STEPS5, "--config.train.grad_accum=4", f"--workdir={tmp_path}"], devices=1)
    losses = train_losses(str(tmp_path))
    for step, loss in losses.items():
        assert abs(loss - one_device_losses[step]) <= 1e-5 * abs(one_device_losses[step]), (step, loss)


def _params(workdir, step):
    restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        else:
            flat[prefix] = np.asarray(node)

    walk("", restored)
    return flat


# A mixture-of-experts run too: capacity dispatch and router jitter (randomness that must resume exactly).
MOE = ["--config.model.num_experts=4", "--config.model.expert_d_ff=64", "--config.model.moe_dispatch=capacity"]
MOE += ["--config.model.router_jitter=0.1"]


# Two pipeline stages on two devices (model/pipeline.py): GPipe over 4 micro-batches of the scanned stack.
STAGES = ["--config.mesh.stage=2", "--config.model.scan_layers=true", "--config.pipeline.microbatches=4"]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="dense"),
        pytest.param(MOE, id="moe", marks=pytest.mark.slow),
        pytest.param(STAGES, id="stages", marks=pytest.mark.slow),
    ],
)
def test_exact_resume_after_sigkill(tmp_path, extra):
    n = 6
    devices = 2 if extra is STAGES else 1
    args = [*SMALL, *extra, f"--config.train.steps={2 * n}", f"--config.checkpoint.every={n}"]
    straight = tmp_path / "straight"
    run_cli("train.py", [*args, f"--workdir={straight}"], devices=devices)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *args, f"--workdir={killed}"],
        env=env(devices),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    committed = killed / "checkpoints" / str(n)
    deadline = time.time() + 300
    # Orbax writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once the save is committed.
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert committed.exists(), "the run ended before its first checkpoint was committed"
    assert not (killed / "checkpoints" / str(2 * n)).exists(), "killed too late: the run had already finished"

    resumed = run_cli("train.py", [*args, f"--workdir={killed}"], devices=devices)
    assert re.search(rf"resumed from .*/{n}\b", resumed.stdout), resumed.stdout
    a, b = train_losses(str(straight)), train_losses(str(killed))
    assert sorted(a) == sorted(b) == list(range(1, 2 * n + 1))
    assert [a[s] for s in a] == [b[s] for s in a]  # bit-identical per-step losses
    pa, pb = _params(str(straight), 2 * n), _params(str(killed), 2 * n)
    assert pa.keys() == pb.keys() and len(pa) > 10
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k
