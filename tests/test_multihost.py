"""Multi-process training on CPU (gloo): 2 processes x 4 devices == 1 x 8; SIGTERM -> one agreed step, a
checkpoint, exit 75 and an exact resume; restores under other process counts and meshes; init failures."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from podformer import distributed, preemption
from podformer.core.errors import UserError
from tests.helpers import REPO, SMALL, env, train_losses

STEPS, EVERY = 20, 10
ARGS = [
    *SMALL,
    f"--config.train.steps={STEPS}",
    f"--config.checkpoint.every={EVERY}",
    "--config.train.eval_steps=1",
    "--config.model.num_layers=1",
    "--config.metrics.peak_tflops=1",  # skips the start-up matmul benchmark
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """``processes`` train.py processes on this machine (one coordinator if more than one); logs next to
    the workdir. Runs overlap: on 2 cores a lone multi-process run leaves them idle at every collective."""

    def __init__(self, workdir, *, processes=2, devices=4, extra=(), cache="", sigterm_at_save=0):
        self.workdir, self.processes = str(workdir), processes
        flags = [[] for _ in range(processes)]
        if processes > 1:
            port = free_port()
            for i in range(processes):
                flags[i] = [
                    f"--config.distributed.coordinator=127.0.0.1:{port}",
                    f"--config.distributed.num_processes={processes}",
                    f"--config.distributed.process_id={i}",
                ]
        # The persistent compilation cache saves XLA time between runs of identical programs, nothing else.
        cache_env = {"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0}
        self.logs = [open(f"{workdir}.{i}.log", "w") for i in range(processes)]  # noqa: SIM115 (see wait)
        self.procs = [
            subprocess.Popen(
                [sys.executable, os.path.join(REPO, "train.py"), *ARGS, *extra, *flags[i], f"--workdir={workdir}"],
                env=env(devices, **(cache_env if cache else {})),
                stdout=self.logs[i],
                stderr=subprocess.STDOUT,
            )
            for i in range(processes)
        ]
        self.signaller = None
        if sigterm_at_save:
            self.signaller = threading.Thread(target=self._sigterm_at_save, args=(sigterm_at_save,), daemon=True)
            self.signaller.start()

    def _sigterm_at_save(self, step: int) -> None:
        # As the periodic save of `step` starts: the agreed step lands after it, with EVERY-1 steps to spare.
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in self.procs) and not saving(self.workdir, step):
            time.sleep(0.01)
        for p in self.procs:
            p.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 400) -> list[int]:
        deadline = time.time() + timeout
        try:
            codes = [p.wait(timeout=max(1, deadline - time.time())) for p in self.procs]
        finally:
            for p, log in zip(self.procs, self.logs, strict=True):
                if p.poll() is None:
                    p.kill()
                log.close()
        return codes

    def output(self) -> str:
        out = []
        for i in range(self.processes):
            lines = open(f"{self.workdir}.{i}.log").read().splitlines()
            out.append(f"--- process {i}:\n" + "\n".join(ln for ln in lines if "[Gloo]" not in ln)[-3000:])
        return "\n".join(out)


def saving(workdir, step: int) -> bool:
    """True once Orbax has started saving ``step`` (it creates `<step>.orbax-checkpoint-tmp...` first)."""
    ckpts = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpts) and any(n.split(".")[0] == str(step) for n in os.listdir(ckpts))


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def close(a: dict, b: dict, rtol: float) -> bool:
    return all(abs(a[s] - b[s]) <= rtol * abs(b[s]) for s in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three phases of concurrent runs, each a different program, so that every later run of the same
    program finds it compiled in the persistent cache: (1) 2x4 and 1x8 uninterrupted; (2) 2x4 and 1x8
    SIGTERMed after their periodic checkpoint; (3) the 2x4 run resumed, and its preemption checkpoint
    restored in 1x8 and in 1x4 under another mesh."""
    root = tmp_path_factory.mktemp("multihost")
    cache = str(root / "jax-cache")
    w = {k: str(root / k) for k in ("straight", "one", "preempted", "single", "r8", "r4")}
    out = {"workdirs": w}

    def finish(name, run):
        out[f"{name}_codes"], out[f"{name}_log"] = run.wait(), run.output()

    phase1 = {"straight": Run(w["straight"], cache=cache), "one": Run(w["one"], processes=1, devices=8, cache=cache)}
    for name, run in phase1.items():
        finish(name, run)
        assert out[f"{name}_codes"] == [0] * run.processes, out[f"{name}_log"]
    phase2 = {
        "preempted": Run(w["preempted"], cache=cache, sigterm_at_save=EVERY),
        "single": Run(w["single"], processes=1, devices=8, cache=cache, sigterm_at_save=EVERY),
    }
    for name, run in phase2.items():
        finish(name, run)
        out[f"{name}_steps"] = checkpoint_steps(w[name])

    step = out["preempted_steps"][-1]
    for k in ("r8", "r4"):  # the preemption checkpoint alone, as if written there
        shutil.copytree(*(os.path.join(w[n], "checkpoints", str(step)) for n in ("preempted", k)))
    phase3 = {
        "resumed": Run(w["preempted"], cache=cache),
        "r8": Run(w["r8"], processes=1, devices=8, cache=cache),
        "r4": Run(w["r4"], processes=1, devices=4, extra=["--config.mesh.fsdp=2", "--config.mesh.tensor=2"]),
    }
    for name, run in phase3.items():
        finish(name, run)
    return out


def test_two_processes_train_like_one(runs):
    one, two = train_losses(runs["workdirs"]["one"]), train_losses(runs["workdirs"]["straight"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    assert close(two, one, 1e-6), (two, one)


def _assert_preempted(runs, name: str, processes: int):
    codes, steps, log = runs[f"{name}_codes"], runs[f"{name}_steps"], runs[f"{name}_log"]
    assert codes == [preemption.EXIT_CODE] * processes, log
    # The periodic checkpoint, then one at the agreed step past it.
    assert steps[0] == EVERY and EVERY < steps[-1] < STEPS and steps[-1] % EVERY, (steps, log)
    assert f"preempted: saved step {steps[-1]}" in log


def test_sigterm_to_all_processes_saves_one_agreed_step_and_resumes_exactly(runs):
    _assert_preempted(runs, "preempted", 2)
    assert runs["resumed_codes"] == [0, 0], runs["resumed_log"]
    resumed_from = f"resumed from {runs['workdirs']['preempted']}/checkpoints/{runs['preempted_steps'][-1]}"
    assert resumed_from in runs["resumed_log"], runs["resumed_log"]
    straight, resumed = train_losses(runs["workdirs"]["straight"]), train_losses(runs["workdirs"]["preempted"])
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert [resumed[s] for s in straight] == [straight[s] for s in straight]  # bit-identical


def test_sigterm_single_process(runs):
    """Without a distributed runtime a Python SIGTERM handler stands in for JAX's preemption service."""
    _assert_preempted(runs, "single", 1)
    one, single = train_losses(runs["workdirs"]["one"]), train_losses(runs["workdirs"]["single"])
    assert [single[s] for s in single] == [one[s] for s in single]


@pytest.mark.parametrize("name", ["r8", "r4"])
def test_checkpoint_restores_under_another_topology(runs, name):
    """The 2-process preemption checkpoint continues in one process on 8 devices, and on 4 devices with a
    data/fsdp/tensor split it was not written with, from the same data position, as the 1x8 run does
    (within 1e-6: another reduction order)."""
    step = runs["preempted_steps"][-1]
    assert runs[f"{name}_codes"] == [0], runs[f"{name}_log"]
    assert f"resumed from {runs['workdirs'][name]}/checkpoints/{step}" in runs[f"{name}_log"], runs[f"{name}_log"]
    losses, one = train_losses(runs["workdirs"][name]), train_losses(runs["workdirs"]["one"])
    assert sorted(losses) == list(range(step + 1, STEPS + 1))
    assert close(losses, one, 1e-6), (losses, one)


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nobody listens there
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            f"--workdir={tmp_path}",
            f"--config.distributed.coordinator={address}",
            "--config.distributed.num_processes=2",
            "--config.distributed.process_id=1",
            "--config.distributed.initialization_timeout=3",
        ],
        env=env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.time() - t0
    assert proc.returncode == distributed.INIT_FAILED_EXIT_CODE, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("podformer: error:")]
    assert len(lines) == 1 and address in lines[0] and "within 3 s" in lines[0], proc.stderr[-3000:]
    # JAX alone would retry for about twice its own timeout (given 63 s) and then abort without the address.
    assert elapsed < 40, elapsed


def test_a_workdir_not_shared_by_all_processes_is_refused(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(REPO, "train.py"),
                f"--workdir={tmp_path / f'local{i}'}",  # two "hosts", each with its own local disk
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            env=env(2),
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "is not one directory shared by all 2 processes" in err and "process 1 cannot see" in err, err[-3000:]


# Settings: which initialisation each environment gets (no processes started).


def _cfg(**kw):
    from podformer.configs import common
    from podformer.model.gpt import GPTConfig

    c = common.base("t", GPTConfig.tiny()).distributed
    for k, v in kw.items():
        c[k] = v
    return c


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PODFORMER_COORDINATOR", "PODFORMER_NUM_PROCESSES", "PODFORMER_PROCESS_ID")):
            monkeypatch.delenv(k)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    return monkeypatch


def test_settings_single_explicit_and_env(clean_env):
    assert distributed.settings(_cfg()).mode == "single"
    s = distributed.settings(_cfg(coordinator="10.0.0.1:1234", num_processes=4, process_id=3))
    assert (s.mode, s.coordinator, s.num_processes, s.process_id) == ("explicit", "10.0.0.1:1234", 4, 3)
    clean_env.setenv("PODFORMER_COORDINATOR", "h:9")
    clean_env.setenv("PODFORMER_NUM_PROCESSES", "2")
    clean_env.setenv("PODFORMER_PROCESS_ID", "1")
    s = distributed.settings(_cfg())
    assert (s.mode, s.coordinator, s.num_processes, s.process_id) == ("explicit", "h:9", 2, 1)
    assert distributed.settings(_cfg(process_id=0)).process_id == 0  # the config wins over the environment
    with pytest.raises(UserError, match="process_id=5 must be in 0..1"):
        distributed.settings(_cfg(process_id=5))
    clean_env.delenv("PODFORMER_COORDINATOR")
    with pytest.raises(UserError, match="needs distributed.coordinator=HOST:PORT"):
        distributed.settings(_cfg())


def test_settings_detect_tpu_vm_and_slurm(clean_env):
    clean_env.setattr(distributed, "_on_cloud_tpu_vm", lambda: True)
    assert distributed.settings(_cfg()).mode == "tpu"
    assert distributed.settings(_cfg(num_processes=1)).mode == "single"  # forced
    clean_env.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="gpu[01-02]", SLURM_NTASKS="16", SLURM_PROCID="9")
    for k, v in {**slurm, "SLURM_LOCALID": "1"}.items():
        clean_env.setenv(k, v)
    s = distributed.settings(_cfg())
    assert (s.mode, s.num_processes, s.process_id) == ("slurm", 16, 9)
    clean_env.setenv("SLURM_NTASKS", "1")  # a one-task step: nothing to join
    assert distributed.settings(_cfg()).mode == "single"
