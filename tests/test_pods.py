"""TPU pods without TPUs: meshes on real slice topologies, compile-only answers, the roofline, the planner."""

import importlib.util
import subprocess
import sys

import ml_collections
import pytest

from podformer import hardware
from podformer import mesh as mesh_lib
from podformer.core.errors import UserError
from tests.helpers import env

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs the [aot] extra: pip install -e '.[aot]'"
)


def mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor, "devices": 0})


def factorisations(n, tensors=(1, 2, 4, 8)):
    for t in tensors:
        f = 1
        while f * t <= n:
            if n % (f * t) == 0:
                yield n // (f * t), f, t
            f *= 2


def neighbours(a, b, shape) -> bool:
    """Chips one ICI hop apart on the torus (wrap-around links included)."""
    d = [min(abs(x - y), s - abs(x - y)) for x, y, s in zip(a, b, shape, strict=True)]
    return sorted(d) == [0] * (len(d) - 1) + [1]


@needs_libtpu
@pytest.mark.parametrize("spec", ["v5p-2048", "v4-1024"])
def test_every_factorisation_of_a_pod_slice_builds_a_mesh_with_tensor_groups_on_neighbouring_chips(spec):
    from podformer import aot

    _, devices = aot.topology_devices(spec)
    shape = mesh_lib.slice_shape(devices)
    count = 0
    for data, fsdp, tensor in factorisations(len(devices)):
        mesh = mesh_lib.make_mesh(mesh_cfg(data, fsdp, tensor), devices)
        assert dict(mesh.shape) == {"data": data, "fsdp": fsdp, "expert": 1, "tensor": tensor}
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
        groups = mesh.devices.reshape(-1, tensor)
        for g in groups[:: max(1, len(groups) // 16)]:  # a sample of groups: each a line of neighbours
            hops = zip(g[:-1], g[1:], strict=True)
            assert all(neighbours(a.coords, b.coords, shape) for a, b in hops), [d.coords for d in g]
        count += 1
    assert count > 30


@needs_libtpu
def test_an_impossible_mesh_is_one_line_naming_the_slice_and_what_works():
    from podformer import aot

    _, devices = aot.topology_devices("v5p-2048")
    with pytest.raises(UserError) as e:
        mesh_lib.make_mesh(mesh_cfg(-1, 1, 3), devices)
    msg = str(e.value)
    assert "\n" not in msg and "8x8x16 slice" in msg and "1024" in msg and "1, 2, 4, 8" in msg, msg
    with pytest.raises(UserError) as e:
        mesh_lib.make_mesh(mesh_cfg(2, 2, 2), devices)
    assert "\n" not in str(e.value) and "8x8x16 slice" in str(e.value)


# ---- compile-only answers ----------------------------------------------------------------------------

COMPILE_RUNS = """
import json, sys
import train
from podformer import metrics
reports = []
for args in json.loads(sys.argv[1]):
    r = train.run(args)
    reports.append({k: r[k] for k in ("fits", "peak_gib", "flops", "bytes", "flops_ratio", "mfu_bound") if k in r})
print("REPORTS " + json.dumps(reports))
"""


def compile_only_runs(tmp_path, runs: list[list[str]], timeout=900):
    """train.py --compile_only in one subprocess (libtpu loads once), $HOME and the cache at empty folders."""
    import json

    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    e = env(JAX_PLATFORMS="cpu", HOME=home, PODFORMER_CACHE=cache)
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_RUNS, json.dumps(runs)],
        cwd=tmp_path,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written  # nothing tokenized, cached or written: no workdir either
    reports = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORTS "))[8:])
    return reports, out


SMALL_COMPILE = ["--config.train.batch_size=8", "--config.train.seq_len=128", "--compile_only=v5e:2x2"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every compile-only run of this module in one subprocess (libtpu and JAX load once): the families'
    tiny configs (the presets' widths take minutes each for the TPU compiler on 2 shared cores), the
    decoder with PaLM's 256k vocabulary (which no tokenizer could be trained for on the embedded corpus)
    under fsdp=2, and gpt2_small's preset batch on v5e-16."""
    tmp_path = tmp_path_factory.mktemp("compile_only")
    wd = f"--workdir={tmp_path / 'wd'}"
    runs = [
        ["--config=configs/gpt.py:tiny", "--config.model.vocab_size=256000", "--config.mesh.fsdp=2", wd]
        + SMALL_COMPILE,
        ["--config=configs/bert.py:tiny", wd, *SMALL_COMPILE],
        ["--config=configs/t5.py:tiny", wd, *SMALL_COMPILE],
        # :memory, the fit alone: its four cost probes would take 4-5 of this fixture's 7 minutes.
        ["--config=configs/gpt.py:gpt2_small", "--compile_only=v5e-16:memory", wd],
    ]
    reports, out = compile_only_runs(tmp_path, runs)
    print("\n".join(ln for ln in out.splitlines() if "per device" in ln or "roofline" in ln or "levers" in ln))
    assert len(reports) == 4
    return reports, out


@needs_libtpu
@pytest.mark.slow
def test_compile_only_needs_no_data_for_any_family_nor_a_256k_vocabulary(compiled):
    reports, out = compiled
    lines = [ln for ln in out.splitlines() if "per device:" in ln or "compiling the train step" in ln]
    assert "4 x TPU v5 lite" in lines[0] and "'fsdp': 2" in lines[0], lines[:2]
    assert "GiB of 16 GiB HBM: fits" in lines[1], lines[:2]
    for r in reports[:3]:
        assert r["fits"] and 0 < r["peak_gib"] < 16
        # The extrapolated compiled FLOPs against podformer's model FLOPs: no remat, so about 1x (the
        # optimizer, norms and softmax on top), never the ~1/L of a loop body counted once.
        assert 0.9 < r["flops_ratio"] < 2.0, r
        assert 0 < r["mfu_bound"] < 1
    assert out.count("roofline on TPU v5e") == 3  # gpt2_small asked for the memory alone


@needs_libtpu
@pytest.mark.slow
def test_gpt2_small_preset_batch_on_v5e_16_does_not_fit_and_says_so(compiled):
    reports, out = compiled
    r = reports[3]
    assert not r["fits"] and r["peak_gib"] > 16  # what the compiler asked for (temporaries alone: ~54 GiB)
    assert "DOES NOT FIT" in out and "levers: --config.model.remat=full" in out
    assert "flops" not in r and "mfu_bound" not in r  # :memory: no probes, and it says so
    assert "no cost analysis (:memory)" in out


@needs_libtpu
@pytest.mark.slow
def test_the_planners_analytic_fit_agrees_with_the_compile(compiled):
    """The planner's analytic estimate (what it answers for GPUs) gives the compile's verdict on both sides
    of the line: the tiny decoder fits v5e:2x2, gpt2_small's preset batch does not fit v5e-16."""
    from podformer import config as config_lib
    from podformer import plan

    reports, _ = compiled
    for args, hw, r in (
        (["--config=configs/gpt.py:tiny", "--config.model.vocab_size=256000", *SMALL_COMPILE[:2]], "v5e-4", reports[0]),
        (["--config=configs/gpt.py:gpt2_small"], "v5e-16", reports[3]),
    ):
        cfg, _ = config_lib.parse_args(args, plan.DEFAULT_CONFIG, {})
        m = plan.model_figures(cfg)
        a = plan.analytic_memory(m["model_cfg"], m["params"], cfg, hardware.parse_hardware(hw))
        assert a["fits"] == r["fits"], (hw, a, r)


def test_out_of_hbm_messages_give_the_memory_asked_for():
    from podformer import aot

    # libtpu's wording with jax 0.10 (and the older "Used X of Y hbm" one); other errors are not refusals.
    said = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (54.12G)"
    assert aot.hbm_exhausted(said + " exceeds available HBM (15.75G).") == 54.12
    assert aot.hbm_exhausted("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 512M of 16G hbm") == 0.5
    assert aot.hbm_exhausted("INVALID_ARGUMENT: shapes differ") is None


def test_cost_extrapolation_from_one_and_two_layer_probes():
    from podformer import aot

    # A cost bilinear in layers n and rows B: 7 + 3n + B (5 + 2n). The probes at n in {1, 2}, B in {4, 8}
    # give it back at 12 layers and 512 rows: 7 + 36 + 512 * 29 = 14891.
    def cost(n, rows):
        return {"flops": 7 + 3 * n + rows * (5 + 2 * n), "bytes": 1.0}

    probes = {(n, rows): cost(n, rows) for n in (1, 2) for rows in (4, 8)}
    assert aot.extrapolate(probes, 4, 512, 12, "flops") == pytest.approx(14891)


def test_roofline_on_hand_worked_figures():
    v5e = hardware.CHIPS["v5e"]  # 197 TFLOP/s, 819 GB/s
    # 19.7 TFLOPs and 40.95 GB per step: 100 ms of compute, 50 ms of HBM traffic -> compute bound, 100 ms.
    r = hardware.roofline(19.7e12, 40.95e9, v5e)
    assert r["compute_s"] == pytest.approx(0.1) and r["memory_s"] == pytest.approx(0.05)
    assert r["step_s"] == pytest.approx(0.1) and r["bound"] == "compute"
    assert r["intensity"] == pytest.approx(19.7e12 / 40.95e9)
    # 9.85 model TFLOPs in that 100 ms step: MFU at most 50%.
    assert hardware.mfu_bound(9.85e12, r["step_s"], v5e) == pytest.approx(0.5)
    # Memory bound: 1.97 TFLOPs (10 ms) against 81.9 GB (100 ms) -> 100 ms, MFU <= 10% of the same work.
    r = hardware.roofline(1.97e12, 81.9e9, v5e)
    assert r["bound"].startswith("memory") and r["step_s"] == pytest.approx(0.1)
    assert hardware.mfu_bound(1.97e12, r["step_s"], v5e) == pytest.approx(0.1)


# ---- presets and the planner -------------------------------------------------------------------------


def test_mt_nlg_530b_has_its_papers_parameter_count():
    from flax import nnx

    from podformer.model import gpt, params

    cfg = gpt.GPTConfig.mt_nlg_530b()
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.vocab_size, cfg.max_len) == (105, 20480, 128, 50257, 2048)
    n = params.count(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))))
    assert abs(n - 530e9) / 530e9 < 0.01, n  # Smith et al. 2022: 530B


@pytest.mark.parametrize(
    "spec, chips, slices, kind",
    [
        ("v5p-1024", 512, 1, "v5p"),
        ("v4-6144x2", 6144, 2, "v4"),  # PaLM: two pods of 3,072 chips
        ("v5e-256", 256, 1, "v5e"),
        ("h100x512", 512, 1, "h100"),
    ],
)
def test_hardware_specs(spec, chips, slices, kind):
    hw = hardware.parse_hardware(spec)
    assert (hw.chips, hw.slices, hw.chip) == (chips, slices, hardware.CHIPS[kind])


@pytest.mark.parametrize("spec", ["v5p-7", "h100", "tpu-8", "v9-8", "x100x8"])
def test_bad_hardware_is_one_line(spec):
    with pytest.raises(UserError) as e:
        hardware.parse_hardware(spec)
    assert "\n" not in str(e.value)


def test_planner_arithmetic_on_hand_worked_figures():
    from podformer import plan

    # GPT-3 by 6N only: 6 * 175e9 * 300e9 = 3.15e23 FLOPs. On 10,000 V100s (125 TFLOP/s each, 1.25e18 in
    # all) for 34 days (2,937,600 s): MFU = 3.15e23 / (1.25e18 * 2,937,600) = 8.578%; 8.16e6 GPU-hours.
    v100s = hardware.parse_hardware("v100x10000")
    s = plan.schedule(6 * 175e9, 300e9, v100s, days=34)
    assert s["total_flops"] == pytest.approx(3.15e23)
    assert s["mfu"] == pytest.approx(0.085784, rel=1e-4)
    assert s["chip_hours"] == pytest.approx(8.16e6)
    # The other way: at 40% MFU on v5p-1024 (512 chips x 459 TFLOP/s = 2.35e17 FLOP/s): 3.15e23 / (0.4 *
    # 2.35008e17) = 3,350,950 s = 38.78 days, 476,580 chip-hours.
    s = plan.schedule(6 * 175e9, 300e9, hardware.parse_hardware("v5p-1024"), mfu=0.4)
    assert s["seconds"] / 86400 == pytest.approx(38.784, rel=1e-4)
    assert s["chip_hours"] == pytest.approx(476580, rel=1e-4)
    # Chinchilla for that compute: N = sqrt(3.15e23 / 120) = 51.23B parameters on 20 N = 1.025T tokens
    # (the paper's approach 1 gives ~20 tokens per parameter at every budget).
    c = plan.chinchilla(3.15e23)
    assert c["params"] == pytest.approx(51.235e9, rel=1e-4) and c["tokens"] / c["params"] == pytest.approx(20.0)


def test_planner_notes_table_and_analytic_fit():
    from podformer import config as config_lib
    from podformer import plan

    rows = plan.notes()
    mfus = [r["mfu"] for r in rows]
    # BERT-base on 16 TPU v2 chips for 12 days, RoBERTa on 1,024 V100s for a day, GPT-3 on 10,000 V100s for
    # 34 days: podformer's own FLOPs (attention included) over the notes' times.
    assert 0.15 < mfus[0] < 0.35 and 0.08 < mfus[1] < 0.25 and 0.08 < mfus[2] < 0.10, mfus
    assert rows[2]["params"] == pytest.approx(175e9, rel=0.01)
    # Analytic: gpt2_small's state is 16 bytes x 124.4M parameters = 1.99 GB, split over 512 H100s.
    cfg, _ = config_lib.parse_args(["--config=configs/gpt.py:gpt2_small"], plan.DEFAULT_CONFIG, {})
    m = plan.model_figures(cfg)
    a = plan.analytic_memory(m["model_cfg"], m["params"], cfg, hardware.parse_hardware("h100x512"))
    assert a["state"] == pytest.approx(16 * m["params"] / 512) and a["fits"]


def test_example_row_is_the_pipelines_row_layout(tmp_path):
    from podformer import aot
    from podformer.configs.common import base
    from podformer.data import packing, tokens
    from podformer.model.gpt import GPTConfig

    docs = [" ".join(str(3 + (i * 7 + j) % 90) for j in range(50)) for i in range(8)]
    encode = lambda ts: [[int(w) for w in t.split()] for t in ts]  # noqa: E731
    store = tokens.build(str(tmp_path / "store"), docs, encode, vocab_size=100, bos_id=1, eos_id=2)
    real = packing.CausalLMRows(store, 32)[0]
    ours = aot.example_row(base("x", GPTConfig.tiny()).data, 32)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
