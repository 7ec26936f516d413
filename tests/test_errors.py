"""Bad input gets one line naming the problem and the fix (exit code 2), never a deep traceback."""

import os

import pytest

from podformer import config as config_lib
from podformer.core.errors import UserError
from podformer.model import families
from tests.helpers import SMALL, run_cli


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("podformer: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    proc = run_cli("train.py", ["--config.train.stepz=5", f"--workdir={tmp_path}"], check=False)
    _one_line_error(proc, "unknown config key 'stepz'", "train.steps")


def test_wrong_type_is_an_error():
    cfg = config_lib.load_config_file("configs/gpt.py:tiny")
    with pytest.raises(UserError, match="expected an integer"):
        config_lib.apply_override(cfg, "train.steps", "ten")
    with pytest.raises(UserError, match="true or false"):
        config_lib.apply_override(cfg, "checkpoint.async_save", "maybe")
    with pytest.raises(UserError, match="not a field of GPTConfig"):
        with cfg.unlocked():
            cfg.model.nonsense = 1
        config_lib.family_config(cfg.model, families.get("gpt").config)


def test_mesh_that_does_not_match_the_devices(tmp_path):
    proc = run_cli("train.py", ["--config.mesh.data=3", f"--workdir={tmp_path}"], devices=8, check=False)
    _one_line_error(proc, "does not match the 8 devices", "mesh.data=-1")


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    args = ["--config.train.batch_size=12", "--config.mesh.fsdp=8", f"--workdir={tmp_path}"]
    _one_line_error(run_cli("train.py", args, devices=8, check=False), "not divisible", "data*fsdp*expert=8")


def test_missing_tokenizer_file(tmp_path):
    proc = run_cli(
        "train.py", [f"--config.data.tokenizer={tmp_path}/none.model", f"--workdir={tmp_path}/w"], check=False
    )
    _one_line_error(proc, "none.model", "does not exist", "data.tokenizer")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run_cli("train.py", [*SMALL, f"--workdir={blocker}/run"], check=False)
    _one_line_error(proc, "not writable", "--workdir")


def test_unknown_variant_and_flag(tmp_path):
    _one_line_error(run_cli("train.py", ["--config=configs/gpt.py:huge"], check=False), "unknown variant", "gpt2_small")
    _one_line_error(run_cli("train.py", ["--wrokdir=x"], check=False), "did you mean --workdir")
    assert not os.path.exists(os.path.join(tmp_path, "x"))


def test_routing_groups_that_do_not_divide_the_micro_batch():
    cfg = config_lib.load_config_file("configs/gpt.py:moe_tiny")
    for key, value in (("model.moe_dispatch", "capacity"), ("model.moe_group_size", "1000")):
        config_lib.apply_override(cfg, key, value)
    with pytest.raises(UserError, match=r"moe_group_size=1000 does not divide a micro-batch's 32 x 128 = 4096 tokens"):
        config_lib.validate(cfg)
    config_lib.apply_override(cfg, "model.moe_group_size", "1024")
    config_lib.validate(cfg)
