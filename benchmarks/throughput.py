"""Training throughput of podformer's real train step: synthetic tokens and the real input pipeline.

Prints and writes JSON (step time, tokens/s, model TFLOP/s per device, MFU) for a fixed decoder shape:
d_model 256, 4 layers, 4 heads, MLP 1024, vocab 32000, sequence 256, batch 8, float32.

    python benchmarks/throughput.py                       # -> benchmarks/results/throughput.json
    python benchmarks/throughput.py --torch               # also the PyTorch eager reference, same run
    python benchmarks/throughput.py --config.model.scan_layers=true --steps=20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import model as models  # noqa: E402
from podformer import config as config_lib  # noqa: E402
from podformer import flops as flops_lib  # noqa: E402
from podformer import mesh as mesh_lib  # noqa: E402
from podformer import optim, trainer  # noqa: E402
from podformer.losses import LOSSES  # noqa: E402

SHAPE = [
    "--config.model.vocab_size=32000",
    "--config.model.max_len=256",
    "--config.model.d_model=256",
    "--config.model.num_layers=4",
    "--config.model.num_heads=4",
    "--config.model.d_ff=1024",
    "--config.model.dtype=float32",
    "--config.model.scan_layers=false",
    "--config.train.seq_len=256",
    "--config.train.batch_size=8",
    "--config.data.prefetch=4",
]


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq + 1), dtype=np.int32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_weights": np.ones((batch, seq), np.float32),
    }


def time_steps(step_fn, state, next_batch, steps: int, warmup: int):
    for _ in range(warmup):
        state, m = step_fn(state, next_batch())
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step_fn(state, next_batch())
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return state, times


def run(argv: list[str], steps: int, warmup: int, repeats: int) -> dict:
    cfg, _ = config_lib.parse_args([*SHAPE, *argv], "configs/gpt.py:tiny", {})
    config_cls, module_cls = models.FAMILIES[cfg.model.family]
    model_cfg = config_lib.family_config(cfg.model, config_cls)
    t = cfg.train
    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    tx = optim.make_optimizer(cfg.opt, t.steps)

    def make(r):
        return module_cls(model_cfg, rngs=r)

    t0 = time.perf_counter()
    graphdef, state, shardings = trainer.create_state(make, tx, mesh, rules, t.seed)
    example = synthetic_batch(t.batch_size, t.seq_len, model_cfg.vocab_size)
    bshard = trainer.batch_shardings(example, mesh, rules, t.batch_size)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        step_fn = (
            trainer.jit_train_step(
                graphdef,
                shardings,
                bshard,
                loss=LOSSES["causal_lm"],
                accum=t.grad_accum,
                seed=0,
                mesh=mesh,
                rules=rules,
                global_batch=t.batch_size,
                schedule=optim.schedule(cfg.opt, t.steps),
            )
            .lower(state, example)
            .compile()
        )
    compile_s = time.perf_counter() - t0
    _, abstract = trainer.abstract_state(make, tx, 0)
    sizes = {k: int(np.prod(s)) for k, s in trainer.named_param_shapes(abstract).items()}
    fpt = flops_lib.per_token(model_cfg, sizes, t.seq_len)
    ceiling = flops_lib.measure_matmul_peak(n=2048, repeats=3)
    peak, peak_source = flops_lib.peak_per_device(cfg.metrics.peak_tflops)
    tokens = t.batch_size * t.seq_len

    def summarise(name, times):
        step = statistics.median(times)
        tps = tokens / step
        return {
            "input": name,
            "step_time_s": step,
            "tokens_per_sec": tps,
            "model_tflops_per_device": tps * fpt / jax.device_count() / 1e12,
            "mfu": flops_lib.mfu(tps, fpt, peak, jax.device_count()),
            "fraction_of_matmul_ceiling": tps * fpt / jax.device_count() / ceiling,
        }

    results = []
    device_batch = {k: jax.device_put(v, bshard[k]) for k, v in example.items()}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        synth_times = []
        for _ in range(repeats):
            state, times = time_steps(step_fn, state, lambda: device_batch, steps, warmup)
            synth_times.append(statistics.median(times))
        results.append({**summarise("synthetic", synth_times), "runs_median_step_s": synth_times})

        from data import pipeline
        from data.loader import Loader

        data = pipeline.build(cfg.data, vocab_size=model_cfg.vocab_size, seq_len=t.seq_len)
        loader = Loader(
            data.train_rows,
            global_batch=t.batch_size,
            mesh=mesh,
            rules=rules,
            seed=0,
            num_workers=cfg.data.num_workers,
            prefetch=cfg.data.prefetch,
        )
        real_times = []
        for _ in range(repeats):
            state, times = time_steps(step_fn, state, lambda: next(loader), steps, warmup)
            real_times.append(statistics.median(times))
        loader.close()
        results.append({**summarise("pipeline", real_times), "runs_median_step_s": real_times})

    return {
        "benchmark": "throughput",
        "config": cfg.config_spec,
        "overrides": [*SHAPE, *argv],
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "flops_per_token": fpt,
        "parameters": sum(sizes.values()),
        "compile_s": compile_s,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "matmul_ceiling_flops": ceiling,
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs; the median of their medians is reported")
    p.add_argument("--torch", action="store_true", help="also time benchmarks/torch_reference.py")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.json")
    )
    args, overrides = p.parse_known_args()
    report = run(overrides, args.steps, args.warmup, args.repeats)
    if args.torch:
        ref = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [sys.executable, ref, "--steps", str(args.steps)], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        tps = statistics.median(r["tokens_per_sec"] for r in runs)
        report["torch_reference"] = {"tokens_per_sec": tps, "runs": runs}
        report["speedup_vs_torch"] = report["results"][0]["tokens_per_sec"] / tps
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    for r in report["results"]:
        print(
            f"{r['input']:>9}: {r['step_time_s'] * 1e3:7.1f} ms/step  {r['tokens_per_sec']:8.0f} tokens/s  "
            f"{r['model_tflops_per_device']:.3f} TFLOP/s/device  MFU {r['mfu']:.1%}  "
            f"({r['fraction_of_matmul_ceiling']:.0%} of the measured matmul ceiling)"
        )
    if "torch_reference" in report:
        print(
            f"  pytorch: {report['torch_reference']['tokens_per_sec']:8.0f} tokens/s; "
            f"podformer is {report['speedup_vs_torch']:.2f}x"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
