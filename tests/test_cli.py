"""First contact with the entry points: ``--help`` and config errors answer before JAX is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, env

# Runs an entry file as `python train.py ARGS` does, then reports whether JAX (or Flax) was ever imported.
PROBE = """
import runpy, sys
entry, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_path(entry, run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
print("exit", code, "jax" in sys.modules or "flax" in sys.modules, file=sys.stderr)
"""


def _probe(entry: str, *args: str) -> tuple[int, bool, str, str]:
    """(exit code, whether JAX was imported, stdout, stderr without the probe's line)."""
    p = subprocess.run(
        [sys.executable, "-c", PROBE, entry, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120
    )
    *lines, last = p.stderr.strip().splitlines()
    _, code, jax_loaded = last.split()
    return int(code), jax_loaded == "True", p.stdout, "\n".join(lines)


@pytest.mark.parametrize(
    "entry, args, message",
    [
        ("train.py", ["--config.train.stepz=5"], "unknown config key 'stepz' in train; did you mean train.steps?"),
        ("train.py", ["--config.train.steps=many"], "--config.train.steps=many: expected an integer"),
        ("train.py", ["--config.model.num_heads=5"], "d_model=128 is not divisible by num_heads=5"),
        ("train.py", ["--config.model.family=gtp"], "model.family='gtp'; choose one of gpt, bert"),
        ("train.py", ["--config=configs/gtp.py"], "config file 'configs/gtp.py' does not exist"),
        ("train.py", ["--workdirr=x"], "unknown flag --workdirr; did you mean --workdir?"),
        ("train.py", ["--help", "--config=configs/gtp.py"], "config file 'configs/gtp.py' does not exist"),
        ("finetune.py", ["--config.task.typo=1"], "unknown config key 'typo' in task; did you mean task.type?"),
    ],
)
def test_config_errors_come_before_jax(entry, args, message):
    code, jax_loaded, _, err = _probe(entry, *args)
    assert code == 2 and not jax_loaded, (code, jax_loaded, err)
    assert err.startswith("podformer: error: ") and len(err.splitlines()) == 1 and message in err, err


def test_help_lists_the_chosen_configs_keys_before_jax():
    code, jax_loaded, out, err = _probe("train.py", "--help")
    assert code == 0 and not jax_loaded and not err, (code, jax_loaded, err)
    assert "--config=configs/gpt.py:tiny  (the default)" in out and "--workdir=''" in out
    for line in ("  [train]", "    train.steps = 400", "    model.family = 'gpt'", "    opt.lr = 0.003", "  [mesh]"):
        assert line in out.splitlines(), (line, out)
    code, jax_loaded, out, _ = _probe("train.py", "--config=configs/t5.py:tiny", "-h")
    assert code == 0 and not jax_loaded
    assert "    model.family = 't5'" in out and "    model.relative_buckets = 32" in out.splitlines()
    assert "    data.objective = 'span_corruption'" in out.splitlines()
    code, jax_loaded, out, _ = _probe("finetune.py", "--help", "--config=configs/finetune/glue.py:bert_base")
    assert code == 0 and not jax_loaded
    assert "  [task]" in out.splitlines() and "    model.family = 'bert'" in out.splitlines()
    assert "  --config=configs/finetune/glue.py:bert_base  (default: configs/finetune/embedded.py:tiny)" in out


def test_every_config_loads_without_jax():
    """Run configs and the family record are JAX-free: what --help and config errors rest on."""
    code = (
        "import glob, os, sys\n"
        "from podformer import config as config_lib\n"
        "from podformer.model import families\n"
        "specs = [p for p in sorted(glob.glob('configs/**/*.py', recursive=True)) if not p.endswith("
        "('__init__.py', 'common.py', 'zoo.py', 'finetune/base.py'))]\n"
        "for spec in specs:\n"
        "    config_lib.validate(config_lib.load_config_file(spec))\n"
        "for f in families.FAMILIES.values():\n"
        "    f.config()\n"
        "print(len(specs), 'jax' in sys.modules or 'flax' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    n, jax_loaded = p.stdout.split()
    assert int(n) >= 12 and jax_loaded == "False", p.stdout
