"""What a new user meets first: no libtpu noise on a host without TPUs, and a finished run that says so."""

import importlib.util
import os
import subprocess
import sys

import pytest

from podformer.core import platforms
from tests.helpers import REPO, SMALL, env

LIBTPU = importlib.util.find_spec("libtpu") is not None
# What libtpu prints when it looks for TPUs that are not there (and what JAX says when one fails).
NOISE = ("libtpu", "TPU", "INVALID_ARGUMENT", "hostname", "InitGoogle")


def _fake_host(root, *paths, vendor=None):
    for p in paths:
        os.makedirs(os.path.dirname(os.path.join(root, p)), exist_ok=True)
        open(os.path.join(root, p), "w").close()
    if vendor:
        os.makedirs(os.path.join(root, "sys/bus/pci/devices/0000:00:04.0"))
        with open(os.path.join(root, "sys/bus/pci/devices/0000:00:04.0/vendor"), "w") as f:
            f.write(vendor + "\n")
    return str(root)


def test_tpus_are_left_out_only_where_there_are_none(tmp_path, monkeypatch):
    monkeypatch.setattr(platforms, "_installed", lambda m: m == "libtpu")
    bare = _fake_host(tmp_path / "bare")
    assert platforms.choice(bare, {}) == "cpu"
    assert platforms.choice(bare, {"JAX_PLATFORMS": ""}) is None  # an explicit setting wins, even empty
    assert platforms.choice(bare, {"JAX_PLATFORMS": "tpu"}) is None
    assert platforms.choice(bare, {"TPU_WORKER_HOSTNAMES": "10.0.0.2"}) is None  # GKE TPU pods
    for name, host in {
        "v4/v5p VM": _fake_host(tmp_path / "accel", "dev/accel0"),
        "v5e/v6e VM": _fake_host(tmp_path / "vfio", "dev/vfio/0"),
        "PCI only": _fake_host(tmp_path / "pci", vendor="0x1ae0"),
    }.items():
        assert platforms.choice(host, {}) is None, name
    assert platforms.choice(_fake_host(tmp_path / "other", vendor="0x8086"), {}) == "cpu"
    gpu = _fake_host(tmp_path / "gpu", "dev/nvidia0")
    assert platforms.choice(gpu, {}) == "cpu"  # no CUDA plugin: naming cuda would be an error
    monkeypatch.setattr(platforms, "_installed", lambda m: m in ("libtpu", "jax_cuda12_plugin"))
    assert platforms.choice(gpu, {}) == "cuda,cpu"
    monkeypatch.setattr(platforms, "_installed", lambda m: False)
    assert platforms.choice(bare, {}) is None  # without libtpu JAX never tries a TPU


def _without_platforms() -> dict:
    e = env()
    e.pop("JAX_PLATFORMS", None)  # tests/conftest.py sets it; a user's shell does not
    # libtpu stays quiet while another process holds its host-wide lock (/tmp/libtpu_lockfile), as other
    # tests or jobs on a shared machine may: without the lock it always tries, and always prints.
    e["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    return e


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_without_platforms(), capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(not LIBTPU, reason="libtpu is not installed (the [aot] extra): JAX tries no TPU")
@pytest.mark.skipif(platforms.tpu_host(), reason="this host may have TPUs: they are JAX's to use")
def test_no_libtpu_noise_without_tpus():
    bare = _python("import jax; print(jax.devices()[0].platform)")
    if not any(n in bare.stderr for n in NOISE):  # the noise this test is about; gone in some future libtpu?
        pytest.skip("this libtpu prints nothing without TPUs: nothing to silence")
    ours = _python("import podformer, jax; print(jax.devices()[0].platform)")
    assert ours.returncode == 0 and ours.stdout.strip() == "cpu", ours.stderr
    assert not [n for n in NOISE if n in ours.stderr], ours.stderr
    late = _python("import jax; import podformer; print(jax.devices()[0].platform)")  # JAX imported first
    assert late.stdout.strip() == "cpu" and not [n for n in NOISE if n in late.stderr], late.stderr


def test_a_finished_run_says_so_and_exits(tmp_path):
    """A rerun of a workdir at train.steps prints one line (where its outputs are, how to train longer) and
    exits 0 without building data or compiling; a run started without JAX_PLATFORMS prints nothing from
    libtpu."""
    workdir = str(tmp_path / "run")
    args = [sys.executable, "train.py", *SMALL, "--config.train.steps=2", f"--workdir={workdir}"]
    kw = dict(cwd=REPO, env=_without_platforms(), capture_output=True, text=True, timeout=600)
    first = subprocess.run(args, **kw)
    assert first.returncode == 0, first.stderr[-3000:]
    if LIBTPU and not platforms.tpu_host():
        assert not [n for n in NOISE if n in first.stderr], first.stderr[-3000:]
    metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
    again = subprocess.run(args, **kw)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.strip().splitlines()
    assert len(lines) == 1, again.stdout
    assert lines[0].startswith(f"podformer: {workdir} is complete (step 2, train.steps=2)"), lines[0]
    assert f"{workdir}/checkpoints" in lines[0] and "raise train.steps" in lines[0]
    assert again.stderr.strip() == ""  # no warnings, no progress bar
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics  # nothing ran
