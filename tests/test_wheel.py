"""The built wheel, installed somewhere else: every file there, one top-level name, both console scripts run."""

import glob
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.helpers import REPO, SMALL, env

# Where setup.py puts the checkout's folders inside the package.
LAYOUT = {
    "podformer": "podformer",
    "podformer/model": "model",
    "podformer/data": "data",
    "podformer/configs": "configs",
}
# What a built wheel must not carry along from a developer's checkout.
JUNK = ("__pycache__", "*.egg-info", "build", "dist", "runs", ".venv", ".ci-venv", ".git", ".*_cache", "results")
SHADOW = "raise ImportError('the working directory\\'s own {} package was imported')\n"


def expected_files() -> set[str]:
    """Every module, config and C++ source of the checkout, named as the wheel must hold it."""
    out = {"podformer/train.py", "podformer/finetune.py"}
    for package, folder in LAYOUT.items():
        root = os.path.join(REPO, folder)
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
            rel = os.path.relpath(path, root)
            if "__pycache__" in rel or os.path.isdir(path) or package == "podformer" and rel.split(os.sep)[0] in LAYOUT:
                continue
            if path.endswith(".py") or os.sep + "csrc" + os.sep in path:
                out.add(f"{package}/{rel.replace(os.sep, '/')}")
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """The wheel built from a copy of the checkout and installed alone into a fresh virtualenv.

    Installing jax, flax, torch & co. into it would take minutes offline; the virtualenv reaches this
    environment's site-packages through a .pth line instead. Lines of a .pth file only extend sys.path: the
    .pth files *inside* that folder (this checkout's editable-install finder) are never run, so podformer
    can come from nowhere but the wheel."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*JUNK))
    pip = [sys.executable, "-m", "pip"]
    quiet = dict(capture_output=True, text=True, timeout=300)
    build = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(src)],
                           **quiet)  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = glob.glob(str(root / "dist" / "podformer-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, **quiet)
    python = str(root / "venv" / "bin" / "python")
    install = subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], **quiet)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    inner = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], **quiet)
    outer = sorted({*site.getsitepackages(), sysconfig.get_path("purelib")})
    with open(os.path.join(inner.stdout.strip(), "_dependencies.pth"), "w") as f:
        f.write("\n".join(outer) + "\n")
    return {"wheel": wheel, "python": python, "bin": str(root / "venv" / "bin"), "root": root}


@pytest.mark.slow
def test_the_wheel_holds_every_file_under_one_name(venv):
    with zipfile.ZipFile(venv["wheel"]) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    missing = sorted(expected_files() - names)
    assert not missing, f"the wheel lacks {missing[:10]}"
    assert "podformer/configs/finetune/embedded.py" in names and "podformer/data/tasks/embedded.py" in names
    assert "podformer/model/csrc/host_gemm.cc" in names
    assert {n.split("/")[0] for n in names} == {"podformer", next(n for n in names if ".dist-info" in n).split("/")[0]}
    assert "podformer-train = podformer.cli:train" in entry_points
    assert "podformer-finetune = podformer.cli:finetune" in entry_points
    assert "podformer-generate = podformer.generate_cli:main" in entry_points


@pytest.mark.slow
def test_the_installed_scripts_train_and_fine_tune_from_anywhere(venv, tmp_path):
    """From a directory with its own data/ and model/ packages (on the path, as a user's project would
    put them; importing either fails loudly), podformer-train trains a tiny GPT and podformer-finetune
    fine-tunes it on the embedded task, with configs from the package and nothing from the checkout."""
    neutral = tmp_path / "neutral"
    neutral.mkdir()
    e = env()
    e.pop("PYTHONPATH")
    for name in ("data", "model"):
        probe = subprocess.run([venv["python"], "-c", f"import {name}"], cwd=neutral, env=e, capture_output=True)
        assert probe.returncode != 0, f"`import {name}` works in the virtualenv"
    modules = "podformer", "podformer.model", "podformer.data", "podformer.configs", "podformer.train"
    code = f"import importlib; print(*(importlib.import_module(m).__file__ for m in {modules}))"
    where = subprocess.run([venv["python"], "-c", code], cwd=neutral, env=e, capture_output=True, text=True)
    files = where.stdout.split()
    assert len(files) == 5 and all(f.startswith(str(venv["root"] / "venv")) for f in files), where.stdout + where.stderr

    project = tmp_path / "project"
    for name in ("data", "model"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(SHADOW.format(name))
    e["PYTHONPATH"] = str(project)
    kw = dict(cwd=project, env=e, capture_output=True, text=True, timeout=600)
    train = [os.path.join(venv["bin"], "podformer-train"), *SMALL, "--config.train.steps=2", "--workdir=runs/gpt_tiny"]
    trained = subprocess.run(train, **kw)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "configs/gpt.py:tiny" in trained.stdout and (project / "runs" / "gpt_tiny" / "checkpoints" / "2").is_dir()
    small = ["--config.train.steps=2", "--config.train.eval_every=0", "--config.train.seq_len=64"]
    small += ["--config.task.max_train_examples=64", "--config.task.max_eval_examples=16"]
    tuned = subprocess.run([os.path.join(venv["bin"], "podformer-finetune"), *small], **kw)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "model gpt from runs/gpt_tiny" in tuned.stdout and "test accuracy" in tuned.stdout, tuned.stdout
