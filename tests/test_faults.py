"""Fault injection: a user's bad day, row by row (issue 13). Each case asserts the exit code, the one-line
message with no traceback, the checkpoint the run used and, where the recovery point allows, losses
bit-identical to one uninterrupted reference run (shared by the module)."""

import concurrent.futures
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from podformer import checkpoint, preemption, workdir_lock
from podformer.core.errors import UserError
from tests.helpers import REPO, SMALL, env, read_metrics, train_losses

STEPS = 6
ARGS = [*SMALL, f"--config.train.steps={STEPS}", "--config.checkpoint.every=2"]


def start(workdir, *extra, script="train.py", preexec_fn=None, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, script), *ARGS, *extra, f"--workdir={workdir}"],
        cwd=REPO,
        env=env(1, **(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def run(workdir, *extra, script="train.py", preexec_fn=None, extra_env=None, timeout=600):
    proc = start(workdir, *extra, script=script, preexec_fn=preexec_fn, extra_env=extra_env)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line_error(proc, code: int = 2) -> str:
    """The run exited ``code`` with exactly one `podformer: error:` line on stderr and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("podformer: error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def same_losses(workdir, reference: dict):
    got = train_losses(str(workdir))
    assert [m["step"] for m in read_metrics(str(workdir)) if "loss" in m] == list(range(1, STEPS + 1))
    assert got == reference  # bit-identical, every step once


def params(workdir, step) -> dict:
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run: checkpoints 2, 4, 6; (workdir, per-step losses)."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(workdir), train_losses(str(workdir))


def interrupted_copy(reference, tmp_path, keep_upto: int) -> str:
    """The reference workdir as a run killed after committing step ``keep_upto`` would leave it."""
    src, _ = reference
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    for name in os.listdir(os.path.join(dst, "checkpoints")):
        if name.isdigit() and int(name) > keep_upto:
            shutil.rmtree(os.path.join(dst, "checkpoints", name))
    return dst


def largest_file(step_dir: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
    return max(files, key=os.path.getsize)


# -- verified checkpoints ------------------------------------------------------------------------------------


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(reference, tmp_path):
    """Step 6's largest file truncated to half, 64 bytes of step 4's flipped (same size: only the checksum
    can tell): both are moved aside and the run resumes from step 2, bit-identical."""
    workdir = interrupted_copy(reference, tmp_path, keep_upto=6)
    truncated = largest_file(os.path.join(workdir, "checkpoints", "6"))
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    flipped = largest_file(os.path.join(workdir, "checkpoints", "4"))
    data = bytearray(open(flipped, "rb").read())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    open(flipped, "wb").write(bytes(data))
    open(os.path.join(workdir, "metrics.jsonl"), "a").write('{"step": 7, "loss": 1.0')  # a line cut by a kill

    proc = run(workdir)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert re.search(r"checkpoint step 6 is damaged \(.* has \d+ bytes, \d+ were written\); moved it to "
                     r".*damaged_checkpoints/6; falling back to step 4", proc.stdout), proc.stdout  # fmt: skip
    assert re.search(r"checkpoint step 4 is damaged \(.* does not match its checksum\); moved it to "
                     r".*damaged_checkpoints/4; falling back to step 2", proc.stdout), proc.stdout  # fmt: skip
    assert re.search(r"resumed from .*/checkpoints/2\b", proc.stdout), proc.stdout
    for path in (truncated, flipped):  # moved, not deleted
        assert os.path.exists(path.replace("/checkpoints/", "/damaged_checkpoints/"))
    same_losses(workdir, reference[1])


@pytest.mark.parametrize("missing", ["state/_METADATA", "meta/metadata", "data/metadata"])
def test_a_missing_file_makes_the_step_damaged(reference, tmp_path, missing, capsys):
    """Opening the checkpointer (what a resume does first) moves the step aside and picks step 2; the
    resumed run itself is the test above."""
    workdir = interrupted_copy(reference, tmp_path, keep_upto=4)
    os.remove(os.path.join(workdir, "checkpoints", "4", missing))
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    try:
        assert ckpt.latest_step() == 2
    finally:
        ckpt.close()
    assert f"checkpoint step 4 is damaged ({missing} is missing)" in capsys.readouterr().out
    assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "4"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", checkpoint.SINCE]


def test_no_intact_checkpoint_is_one_line_and_a_rerun_starts_fresh(reference, tmp_path):
    workdir = interrupted_copy(reference, tmp_path, keep_upto=2)
    os.remove(os.path.join(workdir, "checkpoints", "2", "state", "_METADATA"))
    with pytest.raises(UserError, match=r"no intact checkpoint in .*damaged steps are in .*damaged_checkpoints"):
        checkpoint.Checkpointer(workdir, keep=3)
    ckpt = checkpoint.Checkpointer(workdir, keep=3)
    assert ckpt.latest_step() is None
    ckpt.close()


def test_a_step_without_a_manifest_is_incomplete_unless_saved_before_manifests(reference, tmp_path):
    workdir = interrupted_copy(reference, tmp_path, keep_upto=4)
    os.remove(os.path.join(workdir, "checkpoints", "4", checkpoint.MANIFEST))
    assert checkpoint.latest_step(workdir) == 2
    # A workdir from before manifests (no manifests_since file): its steps are used as they are.
    os.remove(os.path.join(workdir, "checkpoints", checkpoint.SINCE))
    assert checkpoint.latest_step(workdir) == 4


# -- mismatches and counts: one line before any work ----------------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("--config.model.d_model=32", "model.d_model: 64 -> 32"),
        ("--config.train.batch_size=8", "train.batch_size: 16 -> 8"),
    ],
)
def test_resume_with_another_config_names_the_key(reference, tmp_path, override, named):
    workdir = interrupted_copy(reference, tmp_path, keep_upto=4)
    t0 = time.time()
    proc = run(workdir, override)
    line = one_line_error(proc)
    assert named in line and "checkpoint step 4" in line, line
    assert "data:" not in proc.stdout  # refused before the data is built
    assert time.time() - t0 < 120


@pytest.mark.parametrize("override", ["--config.train.grad_accum=0", "--config.checkpoint.every=0"])
def test_zero_counts_are_refused_at_parse(tmp_path, override):
    proc = run(tmp_path / "w", override)
    line = one_line_error(proc)
    assert override[len("--config.") :].split("=")[0] in line and "at least 1" in line, line
    assert not (tmp_path / "w").exists()  # nothing was created


def test_finetune_init_checkpoint_that_does_not_exist_is_an_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "finetune.py"), f"--config.init.checkpoint={tmp_path}/runs/gpt_tinyy",
         f"--workdir={tmp_path}/ft"],
        cwd=REPO, env=env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = one_line_error(proc)
    assert "gpt_tinyy does not exist" in line and "--config.init.checkpoint=" in line, line


def test_a_corpus_of_nul_bytes_names_the_file(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "nul.txt").write_bytes(b"\0" * 4096)
    proc = run(tmp_path / "w", "--config.data.source=files", f"--config.data.files={corpus}")
    line = one_line_error(proc)
    assert "nul.txt" in line and "empty" in line, line


# -- non-finite steps ------------------------------------------------------------------------------------------

DIVERGE = ["--config.opt.lr=1e30", "--config.checkpoint.every=1", "--config.train.steps=4"]


def test_a_non_finite_loss_stops_the_run_and_is_never_saved(tmp_path):
    """lr=1e30: step 1 trains at lr 0 (warmup), step 2 makes the parameters huge, step 3's loss is nan."""
    workdir = tmp_path / "w"
    proc = run(workdir, *DIVERGE)
    line = one_line_error(proc)
    assert line.startswith("podformer: error: step 3: loss is nan"), line
    assert f"the last good checkpoint is step 2 in {workdir}/checkpoints" in line, line
    assert "train.on_nonfinite=skip" in line
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == [1, 2]
    assert all(np.isfinite(v).all() for v in params(str(workdir), 2).values())


def test_on_nonfinite_skip_leaves_the_update_out_and_counts_it(tmp_path):
    workdir = tmp_path / "w"
    proc = run(workdir, *DIVERGE, "--config.train.on_nonfinite=skip", "--config.train.eval_steps=0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = {m["step"]: m for m in read_metrics(str(workdir)) if "loss" in m}
    assert [lines[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
    # Steps 3 and 4 were not applied: parameters, optimizer moments and step counter are those of step 2.
    p2, p4 = params(str(workdir), 2), params(str(workdir), 4)
    assert len(p2) > 10 and all(np.isfinite(v).all() for v in p2.values())
    assert [k for k in p2 if not np.array_equal(p2[k], p4[k])] == []


# -- one writer per workdir; signals ---------------------------------------------------------------------------


def wait_for(predicate, proc, timeout=300, what=""):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_second_run_on_a_workdir_is_refused_a_dead_ones_lease_is_taken_over_and_sigterm_at_startup_exits_75(
    reference, tmp_path
):
    workdir = tmp_path / "w"
    lock = workdir / "podformer.lock"
    first = start(workdir)
    wait_for(lambda: lock.exists() and lock.stat().st_size > 0, first, what="the first run's lease")

    t0 = time.time()
    second = run(workdir)
    line = one_line_error(second)
    assert f"is in use by pid {first.pid} on host" in line, line
    assert time.time() - t0 < 60

    first.send_signal(signal.SIGKILL)
    first.communicate()
    third = start(workdir)
    out = []
    wait_for(lambda: out.append(third.stdout.readline()) or "data:" in out[-1], third, what="data building")
    third.send_signal(signal.SIGTERM)  # while compiling
    _, err = third.communicate()
    assert any(f"took over the stale lease of pid {first.pid}" in ln for ln in out), out
    assert third.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "SIGTERM during start-up" in err, err[-3000:]

    rerun = run(workdir)
    assert rerun.returncode == 0 and "took over" not in rerun.stdout, rerun.stderr[-3000:]
    same_losses(workdir, reference[1])
    assert not lock.exists()  # released at the end


def test_lease_is_exclusive_until_released(tmp_path, capsys):
    first = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(UserError, match=rf"in use by pid {os.getpid()} on host .*pass another --workdir"):
        workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / workdir_lock.NAME).exists()
    workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()
    assert "took over" not in capsys.readouterr().out


def test_object_store_lease_goes_by_its_heartbeat(tmp_path, capsys):
    """gs:// has no flock: a lease refreshed within STALE_SECONDS refuses, an older one is taken over
    (the same code on a local path, told it is remote)."""
    path = tmp_path / workdir_lock.NAME
    for age, refused in ((5, True), (workdir_lock.STALE_SECONDS + 5, False)):
        path.write_text(json.dumps({"host": "other-vm", "pid": 4242, "heartbeat": time.time() - age}))
        lock = workdir_lock.WorkdirLock(str(tmp_path))
        lock.remote = True
        if refused:
            with pytest.raises(UserError, match="in use by pid 4242 on host other-vm"):
                lock.acquire()
        else:
            lock.acquire()
            assert "took over the stale lease of pid 4242 on host other-vm" in capsys.readouterr().out
            assert json.loads(path.read_text())["pid"] == os.getpid()
            lock.release()
            assert not path.exists()


def test_sigterm_in_the_loop_saves_and_exits_75(tmp_path):
    workdir = tmp_path / "w"
    proc = start(workdir, "--config.train.steps=400", "--config.checkpoint.every=1000")
    wait_for(lambda: (workdir / "metrics.jsonl").exists(), proc, what="the first step")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75 and "Traceback" not in err, err[-3000:]
    steps = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert len(steps) == 1 and checkpoint.latest_step(str(workdir)) == steps[0]  # committed and intact


def test_a_second_signal_is_ignored_within_the_grace_period(monkeypatch, capsys):
    """Two signals to this process (in the loop's watcher): the first asks for the save, the second is
    ignored with a line; once the grace period is over a signal ends the process at once."""
    exits = []
    monkeypatch.setattr(preemption.os, "_exit", exits.append)
    watcher = preemption.Watcher()
    try:
        assert not watcher(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of this thread
        assert watcher(2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert "SIGINT again: ignored while the checkpoint is saved" in capsys.readouterr().err and not exits
        monkeypatch.setattr(preemption, "GRACE_SECONDS", 0.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert exits == [preemption.EXIT_CODE]
        assert "after the 0 s grace: exiting" in capsys.readouterr().err
    finally:
        watcher.close()


# -- save failures, metrics after kills ------------------------------------------------------------------------


def _file_size_limit():
    # An injected write failure through the checkpointer's real I/O: files past 512 KiB fail with EFBIG
    # (Python ignores SIGXFSZ). The metrics, tokenizer and TensorBoard files are smaller; the state is not.
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, resource.RLIM_INFINITY))


def test_a_failed_save_stops_the_run_with_the_last_good_checkpoint_intact(reference, tmp_path):
    workdir = interrupted_copy(reference, tmp_path, keep_upto=2)
    proc = run(workdir, preexec_fn=_file_size_limit)
    line = one_line_error(proc)
    assert re.search(
        r"saving step 4 to .* failed: File too large writing .*; the last good checkpoint is step 2", line
    ), line
    # Nothing after step 2 was committed (the failed save's temporary directory is removed on the next start).
    assert sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == ["2"]
    rerun = run(workdir)  # with room again: resumes from step 2, as if nothing had happened
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert re.search(r"resumed from .*/checkpoints/2\b", rerun.stdout), rerun.stdout
    same_losses(workdir, reference[1])


def test_killed_before_the_first_checkpoint_metrics_keep_one_line_per_step(reference, tmp_path):
    workdir = tmp_path / "w"
    proc = start(workdir, "--config.checkpoint.every=100")
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc, what="two steps")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    rerun = run(workdir, "--config.checkpoint.every=100")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    same_losses(workdir, reference[1])


def _kill_chain(workdir, rng: random.Random, kills_wanted: int, cache: dict, log: list) -> int:
    """Runs of one workdir, each SIGKILLed at a random moment, until ``kills_wanted`` kills; then one run to
    the end. Returns the kills (a run that finished before its kill starts the next workdir)."""
    kills, n = 0, 0
    while kills < kills_wanted:
        wd = workdir / f"run{n}"
        n += 1
        while kills < kills_wanted:
            proc = start(wd, "--config.checkpoint.every=1", extra_env=cache)
            ckpts = wd / "checkpoints"
            seen = set(os.listdir(ckpts)) if ckpts.exists() else set()
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0, 6))  # start-up: data, compile, restore
            else:  # within a second after a save starts: while Orbax writes, finalizes or commits it
                deadline = time.time() + 300
                while proc.poll() is None and time.time() < deadline:
                    now = set(os.listdir(ckpts)) if ckpts.exists() else set()
                    if any(name.endswith(".orbax-checkpoint-tmp") for name in now - seen):
                        break
                    time.sleep(0.01)
                time.sleep(rng.uniform(0, 1.0))
            if proc.poll() is not None:  # it finished first
                proc.communicate()
                assert proc.returncode == 0, proc.stderr[-3000:]
                break
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
            log.append(f"{wd.name}: killed with {sorted(os.listdir(ckpts)) if ckpts.exists() else []}")
        log.append((wd, run(wd, extra_env=cache)))  # to the end (or "complete")
    return kills


@pytest.mark.slow
def test_random_sigkills_resume_bit_identically(reference, tmp_path):
    """>= 20 SIGKILLs at random moments across several runs (two chains at a time, one per core); every run
    ends bit-identical to the reference, one metrics line per step."""
    # Restarts load the compiled step from JAX's persistent cache (the same executable, so the same numbers).
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0}
    logs: list[list] = [[], []]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [
            pool.submit(_kill_chain, tmp_path / f"chain{i}", random.Random(13 + i), 10, cache, logs[i])
            for i in range(2)
        ]
        kills = sum(f.result() for f in futures)
    assert kills >= 20
    finals = [entry for log in logs for entry in log if isinstance(entry, tuple)]
    assert len(finals) >= 2
    for wd, final in finals:
        assert final.returncode == 0, final.stderr[-3000:]
        same_losses(wd, reference[1])
