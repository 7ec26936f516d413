"""Pipeline stages on 8 fake CPU devices: the schedule's overhead against fsdp-only, and its bubble measured.

    python benchmarks/pipeline.py                       # -> benchmarks/results/pipeline.json
    python benchmarks/pipeline.py --steps=3 --rounds=1  # quicker

Eight fake devices share this host's cores, so this shows what the schedule costs, not a speed-up: a stage
computes in every iteration, also in the bubble's idle ones (SPMD: each stage runs the same program), so the
step time at a fixed micro-batch size grows with the iterations, R*M + S - 1, not with the useful R*M. A
least-squares fit of step time = a + tau * iterations over the three GPipe runs of one stage count gives tau,
the time of one iteration, and a, the step's fixed part (embeddings, head, optimizer); the measured bubble of
a run is then (S - 1) * tau_R / (step time - a), set beside the formula (S-1)/(R*M+S-1), where a circular
iteration runs 1/R of a stage's layers: tau_R = tau / R.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from podformer import config as config_lib  # noqa: E402
from podformer import mesh as mesh_lib  # noqa: E402
from podformer import optim, trainer  # noqa: E402
from podformer.losses import LOSSES  # noqa: E402
from podformer.model import families, pipeline  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = ["--config.model.d_model=64", "--config.model.num_layers=8", "--config.model.scan_layers=true"]
MODEL += ["--config.train.seq_len=64", "--config.model.vocab_size=512"]
ROWS = 8  # rows per pipeline micro-batch (fsdp-only runs: the same total batch)
# (name, stage, fsdp, microbatches, repeats)
RUNS = [
    ("fsdp8", 1, 8, 0, 1),
    ("s2_gpipe_m2", 2, 4, 2, 1),
    ("s2_gpipe_m4", 2, 4, 4, 1),
    ("s2_gpipe_m8", 2, 4, 8, 1),
    ("s2_circular_m4_r2", 2, 4, 4, 2),
    ("s4_gpipe_m2", 4, 2, 2, 1),
    ("s4_gpipe_m4", 4, 2, 4, 1),
    ("s4_gpipe_m8", 4, 2, 8, 1),
    ("s4_circular_m4_r2", 4, 2, 4, 2),
]


def build(stage: int, fsdp: int, microbatches: int, repeats: int, batch: int):
    args = [*MODEL, f"--config.train.batch_size={batch}", f"--config.mesh.stage={stage}"]
    args += [f"--config.mesh.fsdp={fsdp}", "--config.mesh.data=1"]
    args += [f"--config.pipeline.microbatches={microbatches}", f"--config.pipeline.repeats={repeats}"]
    cfg, _ = config_lib.parse_args(args, "configs/gpt.py:tiny", {})
    row = families.FAMILIES[cfg.model.family]
    model_cfg = config_lib.family_config(cfg.model, row.config)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = pipeline.staged_rules(cfg.mesh.rules, mesh.shape)
    pipe = trainer.pipeline_schedule(cfg, model_cfg, mesh.shape)
    tx, t = optim.make_optimizer(cfg.opt, 100), cfg.train
    module_cls = row.module_class()
    make = lambda r: module_cls(model_cfg, rngs=r)  # noqa: E731
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model_cfg.vocab_size, (batch, t.seq_len), dtype=np.int32)
    ones = np.ones_like(ids)
    positions = np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), ids.shape).copy()
    example = dict(inputs=ids, targets=ids, segment_ids=ones, positions=positions, loss_weights=ones * 1.0)
    graphdef, state, shardings = trainer.create_state(make, tx, mesh, rules, t.seed)
    t0 = time.perf_counter()
    step, bshard = trainer.compile_train_step(
        graphdef, state, shardings, example, loss=LOSSES["causal_lm"], train_cfg=t, mesh=mesh, rules=rules,
        schedule=optim.schedule(cfg.opt, 100), pipeline=pipe,
    )  # fmt: skip
    compile_s = time.perf_counter() - t0
    batch_dev = {k: jax.device_put(v, bshard[k]) for k, v in example.items()}
    return step, state, batch_dev, pipe, compile_s


def time_steps(step, state, batch, steps: int) -> tuple[float, object]:
    state, m = step(state, batch)  # warm
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps, state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pipeline.json"))
    a = ap.parse_args()
    built = {}
    for name, stage, fsdp, m, r in RUNS:
        batch = ROWS * (m or 4)  # fsdp-only: the batch of the 4-micro-batch runs
        built[name] = build(stage, fsdp, m, r, batch)
        print(f"{name}: compiled in {built[name][4]:.1f} s", flush=True)
    times = {name: [] for name in built}
    for _ in range(a.rounds):  # interleaved rounds: every run under the same machine load
        for name, (step, state, batch, _, _) in built.items():
            dt, state = time_steps(step, state, batch, a.steps)
            built[name] = (step, state, *built[name][2:])
            times[name].append(dt)
    results = []
    for name, stage, fsdp, m, r in RUNS:
        pipe = built[name][3]
        row = {"name": name, "stage": stage, "fsdp": fsdp, "microbatches": m, "repeats": r}
        row |= {"batch": ROWS * (m or 4), "step_s": statistics.median(times[name]), "compile_s": built[name][4]}
        if pipe is not None:
            row |= {"iterations": pipe.iterations, "bubble_formula": pipe.bubble}
        results.append(row)
    for stage in (2, 4):  # the fit over this stage count's GPipe runs
        gpipe = [x for x in results if x["stage"] == stage and x["repeats"] == 1]
        fixed, tau = np.polynomial.polynomial.polyfit([x["iterations"] for x in gpipe], [x["step_s"] for x in gpipe], 1)
        for x in results:
            if x["stage"] == stage:
                x |= {"fit_tau_s": tau, "fit_fixed_s": fixed}
                x["bubble_measured"] = (stage - 1) * tau / x["repeats"] / (x["step_s"] - fixed)
    base = next(x for x in results if x["stage"] == 1)
    for x in results:
        if x["microbatches"] == 4:
            x["step_vs_fsdp8_same_batch"] = x["step_s"] / base["step_s"]
        print(json.dumps(x), flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    env = {"devices": jax.device_count(), "cpus": os.cpu_count(), "jax": jax.__version__, "steps": a.steps}
    with open(a.out, "w") as f:
        json.dump({"env": env, "model": MODEL, "rows_per_microbatch": ROWS, "runs": results}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
