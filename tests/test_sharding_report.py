"""No silent replication: what a mesh axis cannot shard is reported at start, and is an error with
mesh.strict, except replication by design. Abstract states only (jax.eval_shape): no parameter is made."""

import dataclasses

import jax
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec

from podformer import trainer
from podformer.configs.common import RULES
from podformer.core import sharding
from podformer.core.errors import UserError
from podformer.model import gpt
from tests.helpers import run_cli


def _mesh(data, fsdp, tensor):
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _abstract(cfg):
    return trainer.abstract_state(lambda r: gpt.GPT(cfg, rngs=r), optax.adamw(1e-3), 0)[1]


def _spec(shardings, *path):
    node = shardings
    for p in path:
        node = node[p]
    return node.get_value().spec


def test_gpt2_small_under_tensor_2_pads_and_shards_its_vocabulary(capsys):
    cfg = gpt.GPTConfig.gpt2_small()
    abstract, mesh = _abstract(cfg), _mesh(4, 1, 2)
    shardings = trainer.state_shardings(abstract, mesh, RULES, strict=True)
    assert abstract["model"]["embed"].shape == (50304, 768)
    assert _spec(shardings, "model", "embed") == PartitionSpec("tensor", None)
    # The optimizer state follows its parameter.
    for moment in ("mu", "nu"):
        assert _spec(shardings, "opt", "opt_state", 0, moment, "embed") == PartitionSpec("tensor", None)
    assert sharding.unsharded(abstract, mesh, RULES) == []
    assert capsys.readouterr().out == "sharding: every parameter is sharded over the mesh axes its rules name\n"


def test_an_unpadded_vocabulary_is_reported_with_its_cost():
    """GPT-2's 50,257 rows do not divide by tensor=2: the table and its two AdamW moments stay whole on
    every device, half of which sharding would have saved."""
    cfg = gpt.GPTConfig.gpt2_small(vocab_multiple=1)
    findings = sharding.unsharded(_abstract(cfg), _mesh(4, 1, 2), RULES, trainer._param_namer(_abstract(cfg)))
    assert {(f.name, f.logical, f.size, f.mesh_axis, f.by_design) for f in findings} == {
        ("embed", "vocab", 50257, "tensor", "")
    }
    assert sum(f.extra_bytes for f in findings) == 3 * 50257 * 768 * 4 / 2
    with pytest.raises(UserError, match=r"vocabulary's 50257 rows is not divisible by mesh.tensor=2: .*vocab_multiple"):
        sharding.check_strict(findings, 8)


def test_indivisible_heads_are_reported_and_refused_under_strict(capsys):
    # 5 heads of 32 under tensor=2 (and fsdp=2 on d_model=64, which divides): every attention projection
    # is whole on each device. Per device that is half of each array, times 3 with AdamW's moments.
    cfg = gpt.GPTConfig.tiny(vocab_size=256, d_model=64, num_heads=5, head_dim=32, num_layers=1, max_len=16)
    abstract, mesh = _abstract(cfg), _mesh(2, 2, 2)
    trainer.state_shardings(abstract, mesh, RULES)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "heads=5 over tensor=2" in line and "by design" not in line
    assert "blocks.layers.attn.{key,query,value}.{bias,kernel}, blocks.layers.attn.out.kernel" in line
    kernel = 64 * 5 * 32 * 4 / 2  # (D, H, K) float32 over fsdp=2, replicated over tensor
    bias = 5 * 32 * 4
    expected = 3 * (4 * kernel + 3 * bias) / 2
    assert sum(f.extra_bytes for f in sharding.unsharded(abstract, mesh, RULES)) == expected
    with pytest.raises(UserError) as e:
        trainer.state_shardings(abstract, mesh, RULES, strict=True)
    assert str(e.value).startswith(
        "mesh.strict: num_heads=5 is not divisible by mesh.tensor=2: use mesh.tensor=1 or a model.num_heads "
        "divisible by 2 (blocks.layers.attn.query.kernel and 6 more would be replicated"
    )


@pytest.mark.parametrize(
    "heads,kv_heads,tensor,by_design",
    [
        (4, 1, 2, True),  # multi-query (PaLM): the one key/value head on every shard
        (8, 2, 4, True),  # grouped-query with fewer groups than shards: each shard keeps its group's head
        (6, 3, 2, False),  # 3 groups over 2 shards: uneven, an accident
    ],
)
def test_key_value_heads_replicated_by_design(heads, kv_heads, tensor, by_design):
    cfg = gpt.GPTConfig.tiny(vocab_size=256, d_model=64, num_heads=heads, num_kv_heads=kv_heads, head_dim=8)
    abstract, mesh = _abstract(dataclasses.replace(cfg, num_layers=1, max_len=16)), _mesh(8 // tensor, 1, tensor)
    findings = sharding.unsharded(abstract, mesh, RULES, trainer._param_namer(abstract))
    assert {f.name for f in findings} == {
        f"blocks.layers.attn.{p}.{leaf}" for p in ("key", "value") for leaf in ("bias", "kernel")
    }
    assert all(bool(f.by_design) == by_design for f in findings)
    if by_design:
        sharding.check_strict(findings, 8)  # passes
        assert "(by design: multi-query / grouped-query attention" in sharding.report(findings)
    else:
        with pytest.raises(UserError, match=r"num_kv_heads=3 is not divisible by mesh.tensor=2"):
            sharding.check_strict(findings, 8)


def test_strict_is_a_one_line_error_through_train_py(tmp_path):
    """Before any data is read or anything compiled: exit 2 and one line on stderr."""
    args = [
        f"--workdir={tmp_path / 'run'}",
        "--config.model.num_heads=5",
        "--config.model.head_dim=32",
        "--config.mesh.tensor=2",
        "--config.mesh.strict=true",
        "--config.train.steps=1",
    ]
    proc = run_cli("train.py", args, devices=8, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "podformer: error: mesh.strict: num_heads=5 is not divisible by mesh.tensor=2: use mesh.tensor=1"
    ), proc.stderr
    assert "data:" not in proc.stdout  # refused before the data pipeline was built
