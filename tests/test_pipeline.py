"""Pipeline stages (model/pipeline.py): the stage axis, the schedules' bubble, bad input, and on 8 fake devices
the losses of every acceptance mesh against one device, grad accumulation, and checkpoints across stage counts."""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from podformer import mesh as mesh_lib
from podformer import train, trainer
from podformer.configs import gpt as gpt_configs
from podformer.configs.common import RULES
from podformer.core import sharding
from podformer.core.errors import UserError
from podformer.model import gpt, pipeline
from tests.helpers import SMALL, train_losses


def _mesh_cfg(**kw):
    base = dict(stage=1, data=1, fsdp=1, expert=1, tensor=1, devices=0, dcn_stage=1, dcn_data=-1, dcn_fsdp=1)
    return ml_collections.ConfigDict({**base, **kw})


def test_stage_is_the_outermost_mesh_axis():
    mesh = mesh_lib.make_mesh(_mesh_cfg(stage=2, fsdp=-1))
    assert dict(mesh.shape) == {"stage": 2, "data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # Each stage a block of consecutive devices (neighbouring chips on a torus): stage 0 holds devices 0..3.
    assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
    with pytest.raises(UserError, match="mesh.stage=3 must be a positive divisor"):
        mesh_lib.make_mesh(_mesh_cfg(stage=3))


def test_stacked_weights_split_over_stages():
    cfg = gpt.GPTConfig.tiny(d_model=32, num_layers=4, scan_layers=True, vocab_size=256)
    abstract = nnx.state(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
    mesh = mesh_lib.make_mesh(_mesh_cfg(stage=4, fsdp=2))
    rules = pipeline.staged_rules(RULES, mesh.shape)
    assert pipeline.staged_rules(RULES, {"data": 8}) == RULES  # no stage axis: the rules as they are
    flat = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh, rules)))
    kernel = flat[("blocks", "layers", "mlp", "wi", "kernel")].get_value().spec
    assert tuple(kernel) == ("stage", "fsdp", None)  # (layers, embed, mlp): 1 layer per stage
    assert "stage" not in tuple(flat[("embed",)].get_value().spec)  # the embedding is not staged


@pytest.mark.parametrize(
    "S, M, R, bubble",
    [(2, 4, 1, 1 / 5), (4, 8, 1, 3 / 11), (4, 4, 1, 3 / 7), (2, 4, 2, 1 / 9), (4, 8, 3, 3 / 27)],
)
def test_bubble_fraction_is_the_formula(S, M, R, bubble):
    # GPipe (S-1)/(M+S-1); circular (S-1)/(R*M+S-1), worked by hand for each row.
    s = pipeline.Schedule(S, M, R)
    assert s.iterations == R * M + S - 1
    assert s.bubble == pytest.approx(bubble, abs=0)
    line = s.describe(num_layers=S * R * 2)
    assert f"= {S - 1}/{R * M + S - 1} = {bubble:.4f}" in line, line


def _cfg(**overrides):
    c = gpt_configs.get_config("tiny")
    c.model.scan_layers = True
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def _schedule(c, stage, fsdp=1):
    model_cfg = gpt.GPTConfig(**{k: v for k, v in c.model.to_dict().items() if k != "family"})
    shape = {"stage": stage, "data": 1, "fsdp": fsdp, "expert": 1, "tensor": 1}
    return trainer.pipeline_schedule(c, model_cfg, shape)


def test_the_schedule_from_the_config():
    assert _schedule(_cfg(), 1) is None  # no stages: the ordinary scan
    s = _schedule(_cfg(), 2)
    assert (s.stages, s.microbatches, s.repeats) == (2, 4, 1)  # default: 2 x stages micro-batches
    s = _schedule(_cfg(pipeline__microbatches=8, pipeline__repeats=2), 2)
    assert (s.stages, s.microbatches, s.repeats) == (2, 8, 2)


@pytest.mark.parametrize(
    "overrides, stage, message",
    [
        ({"model__num_layers": 6}, 4, "model.num_layers=6 is not divisible by mesh.stage=4 = 4"),
        (
            {"model__num_layers": 6, "mesh__dcn_stage": 2},
            4,
            "num_layers=6 is not divisible by mesh.stage x mesh.dcn_stage=4",
        ),
        ({"pipeline__repeats": 2}, 4, r"num_layers=4 is not divisible by mesh.stage=4 x pipeline.repeats=2 = 8"),
        (
            {"model__num_layers": 8, "pipeline__microbatches": 2, "pipeline__repeats": 2},
            4,
            "pipeline.microbatches=2 is fewer than mesh.stage=4",
        ),
        ({"model__scan_layers": False}, 2, "set --config.model.scan_layers=true"),
        ({"pipeline__microbatches": 3}, 2, r"batch of 32 rows .* not divisible by pipeline.microbatches=3"),
        ({"train__grad_accum": 4, "pipeline__microbatches": 16}, 2, r"batch of 8 rows .*microbatches=16"),
        ({"model__num_experts": 4}, 2, "do not run mixture-of-experts layers"),
    ],
)
def test_bad_input_is_one_line(overrides, stage, message):
    with pytest.raises(UserError, match=message) as e:
        _schedule(_cfg(**overrides), stage)
    assert "\n" not in str(e.value)


def test_encoder_decoders_are_refused():
    from podformer.configs import t5 as t5_configs
    from podformer.model import t5

    c = t5_configs.get_config("tiny")
    model_cfg = t5.T5Config(**{k: v for k, v in c.model.to_dict().items() if k != "family"})
    with pytest.raises(UserError, match=r"pipeline stages run decoder-only models, not t5 \(seq2seq\)"):
        trainer.pipeline_schedule(c, model_cfg, {"stage": 2, "data": 1, "fsdp": 1})


def test_micro_batches_spread_over_data_parallel_devices():
    with pytest.raises(UserError, match="micro-batches of 4 rows .* data-parallel size data\\*fsdp\\*expert=8"):
        _schedule(_cfg(pipeline__microbatches=8), 2, fsdp=8)


def test_a_layer_stack_under_stages_equals_the_scan():
    """Forward and gradients of a 4-layer stack under GPipe and circular, on a 2-stage mesh == the plain scan
    (remat=full: the policy applies per layer inside the stages as in the scan)."""
    cfg = gpt.GPTConfig.tiny(d_model=32, num_layers=4, num_heads=2, scan_layers=True, vocab_size=256, remat="full")
    model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)

    def loss(state, ids):
        return jnp.mean(nnx.merge(graphdef, state)(ids) ** 2)

    ref, ref_grads = jax.value_and_grad(loss)(state, ids)
    mesh = mesh_lib.make_mesh(_mesh_cfg(stage=2, fsdp=2, devices=4))
    abstract = nnx.state(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
    rules = pipeline.staged_rules(RULES, mesh.shape)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        placed = jax.device_put(state, sharding.state_shardings(abstract, mesh, rules))
        for sched in (pipeline.Schedule(2, 4), pipeline.Schedule(2, 2, repeats=2)):

            def staged(state, ids, sched=sched):
                with pipeline.use(sched):
                    return loss(state, ids)

            value, grads = jax.jit(jax.value_and_grad(staged))(placed, ids)
            assert abs(float(value) - float(ref)) <= 1e-6 * abs(float(ref)), sched
            for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


STAGED = [*SMALL, "--config.model.num_layers=4", "--config.model.scan_layers=true", "--config.train.steps=5"]
STAGED += ["--config.train.eval_steps=0", "--config.opt.decay_steps=5", "--config.checkpoint.every=100"]


def _close(losses, reference, what):
    assert sorted(losses) == [1, 2, 3, 4, 5], (what, losses)
    for step, loss in losses.items():
        assert abs(loss - reference[step]) <= 1e-5 * abs(reference[step]), (what, step, loss, reference[step])


@pytest.mark.slow
def test_staged_losses_equal_one_device(tmp_path, capsys):
    """Every acceptance mesh for 5 steps == 1 device (float32, scanned); grad accumulation with stages ==
    the full batch; a stage=4 checkpoint resumes on stage=1 and stage=2 and the losses continue."""
    train.run([*STAGED, "--config.mesh.devices=1", f"--workdir={tmp_path / 'one'}"])
    one = train_losses(str(tmp_path / "one"))
    runs = {  # name: (stage, dcn_stage, data, fsdp, tensor, microbatches, repeats, grad_accum)
        "s2f4_gpipe_m4": (2, 1, 1, 4, 1, 4, 1, 1),
        "s4f2_gpipe_m8": (4, 1, 1, 2, 1, 8, 1, 1),
        "s2t2f2_circular_m4": (2, 1, 1, 2, 2, 4, 2, 1),
        # data parallel across the stage groups; the 2 stages on 2 slices (the fake devices' halves)
        "dcn2_d2f2_circular_m2_accum2": (1, 2, 2, 2, 1, 2, 2, 2),
    }
    for name, (s1, dcn, d, f, t, m, r, a) in runs.items():
        s = s1 * dcn
        mesh = [f"--config.mesh.stage={s1}", f"--config.mesh.dcn_stage={dcn}", f"--config.mesh.data={d}"]
        mesh += [f"--config.mesh.fsdp={f}"]
        sched = [f"--config.pipeline.microbatches={m}", f"--config.pipeline.repeats={r}"]
        every = ["--config.checkpoint.every=3"] if s == 4 else []
        args = [*STAGED, *mesh, f"--config.mesh.tensor={t}", *sched, f"--config.train.grad_accum={a}", *every]
        train.run([*args, f"--workdir={tmp_path / name}"])
        _close(train_losses(str(tmp_path / name)), one, name)
        expect = pipeline.Schedule(s, m, r)
        printed = re.findall(r"^pipeline: .*$", capsys.readouterr().out, re.M)
        assert printed == [expect.describe(4)] and f"= {expect.bubble:.4f}" in printed[0], printed

    # The stage=4 run's checkpoint at step 3 (layers in their [layers, ...] layout) resumes without stages
    # and on 2 stages; steps 4 and 5 continue the one-device losses.
    for s, devices in ((1, 1), (2, 8)):
        work = tmp_path / f"resume_on_{s}"
        shutil.copytree(tmp_path / "s4f2_gpipe_m8", work)
        shutil.rmtree(work / "checkpoints" / "5")
        mesh = [f"--config.mesh.stage={s}", f"--config.mesh.devices={devices}"]
        train.run([*STAGED, *mesh, "--config.checkpoint.every=3", f"--workdir={work}"])
        assert re.search(r"resumed from .*/3\b", capsys.readouterr().out)
        _close(train_losses(str(work)), one, f"resumed on stage={s}")
    assert os.path.isdir(tmp_path / "resume_on_2" / "checkpoints" / "5")


def test_the_planner_splits_the_stack_over_stages():
    """GPT-2 small on 64 H100s with 4 stages: the 12 blocks' state over all 64 chips, the embeddings over the
    16 chips of a stage (every stage holds them), worked from the architecture by hand."""
    from podformer import config as config_lib
    from podformer import hardware, plan

    args = ["--config=configs/gpt.py:gpt2_small", "--config.mesh.stage=4", "--config.pipeline.microbatches=8"]
    cfg, _ = config_lib.parse_args(args, plan.DEFAULT_CONFIG, {})
    m = plan.model_figures(cfg)
    d = 768
    block = 12 * d * d + 13 * d  # q/k/v/out 4d^2 + 4d, MLP 8d^2 + 5d, two LayerNorms 4d
    rest = 50304 * d + 1024 * d + 2 * d  # token table (padded vocabulary, tied head), positions, final norm
    assert (m["stack_params"], m["params"] - m["stack_params"]) == (12 * block, rest - (50304 - 50257) * d)
    a = plan.analytic_memory(m["model_cfg"], m["params"], cfg, hardware.parse_hardware("h100x64"), m["stack_params"])
    held = m["params"] - m["stack_params"]  # params counts the real vocabulary, as the state estimate does
    assert a["state"] == pytest.approx(16 * (12 * block / 64 + held / 16))
    assert a["bubble"] == pytest.approx(3 / 11) and a["stages"] == 4
    with pytest.raises(UserError, match="mesh.stage=4 does not divide the 6 chips"):
        plan.analytic_memory(m["model_cfg"], m["params"], cfg, hardware.parse_hardware("h100x6"), m["stack_params"])


def test_staged_cost_probes_run_the_stages_data_parallel_and_add_the_bubble():
    """compile-only's cost probes for a staged run: the same devices without stages (within and across
    slices), and the layers' share of the extrapolated cost times the schedule's iterations / (R*M)."""
    from podformer import aot

    c = _cfg(mesh__stage=2, mesh__dcn_stage=2, mesh__data=1, mesh__fsdp=2, mesh__dcn_data=3)
    m = aot.config_with(c, 8, unstaged=True).mesh
    assert (m.stage, m.dcn_stage, m.data, m.dcn_data, m.fsdp) == (1, 1, 2, 6, 2)
    m = aot.config_with(_cfg(mesh__stage=4), 8, unstaged=True).mesh
    assert (m.stage, m.data, m.dcn_data) == (1, -1, -1)  # -1: the rest, stages included
    # cost(layers n, rows r) = 10 + 3n + r (2 + 5n): 4 layers, 6 rows, the layers' part x 1.25
    probes = {(n, r): {"flops": 10 + 3 * n + r * (2 + 5 * n)} for n in (1, 2) for r in (2, 4)}
    assert aot.extrapolate(probes, 2, 6, 4, "flops") == 10 + 12 + 6 * (2 + 20)
    assert aot.extrapolate(probes, 2, 6, 4, "flops", 1.25) == 10 + 15 + 6 * (2 + 25)
