"""Training throughput of podformer's real train step, per benchmark shape (benchmarks/shapes.py).

    python benchmarks/throughput.py --torch              # the CPU suite + PyTorch reference -> results/throughput.json
    python benchmarks/throughput.py --shapes=decoder-cpu --rounds=5 --steps=8
    python benchmarks/throughput.py --torch --shapes=decoder-cpu --runs=3   # XLA's path and the host BLAS's
    python benchmarks/throughput.py --shapes=decoder-gpt2-small      # on a GPU/TPU: realistic shapes

For each shape and each CPU path (``--paths``; on a CPU both XLA's own ops, the default, and the
opt-in host BLAS of model/kernels.py, each its own compiled step and state): compile time, per-device
memory (XLA's analysis) and peak host RSS, then ``rounds`` rounds of: ``steps`` train steps on synthetic
tokens already on the device, per path; the same float32 matmul that defines the machine's ceiling; the
PyTorch eager reference (``--torch``, decoder-cpu only, in a separate process that waits while podformer
runs); ``steps`` steps of the first path fed by the real input pipeline. Interleaving puts every
measurement of a round under the same machine load, so the ratios per round (each path / PyTorch,
model FLOP/s / ceiling, pipeline / synthetic) are reported as medians over rounds; absolute figures
are medians over rounds too. Steps are dispatched back to back as in train.py (the host prepares step
N+1 while step N runs), and timed over the whole run of steps.

The ceiling: the best rate, over 3 tries per round, of one 2048 x 2048 x 2048 float32 matmul, through
XLA's dot and, where it is built, through the host BLAS (model/host_blas.py), whichever is faster.
It is what this machine delivers on a large square GEMM -- an upper bound for the model's matmuls,
which are smaller or skinnier -- not the cores' FMA peak. MFU on an accelerator uses the spec-sheet
bf16 peak (podformer/flops.py); on a CPU it is model FLOP/s over this ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from podformer import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # before JAX starts its threads (podformer/hostmem.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.shapes import BY_NAME, SHAPES, Shape  # noqa: E402
from podformer import config as config_lib  # noqa: E402
from podformer import flops as flops_lib  # noqa: E402
from podformer import mesh as mesh_lib  # noqa: E402
from podformer import optim, trainer  # noqa: E402
from podformer.core.errors import UserError  # noqa: E402
from podformer.losses import LOSSES  # noqa: E402
from podformer.model import families, host_blas, kernels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN_KEYS = ("inputs", "targets", "encoder_inputs", "decoder_inputs", "decoder_targets")
CEILING_N = 2048


class Skip(Exception):
    """A shape that cannot run here (family not built yet, no accelerator)."""


def synthetic(batch: dict, vocab: int, seed: int = 0) -> dict:
    """The real batch's layout with random token ids: no input pipeline, same compute."""
    rng = np.random.default_rng(seed)
    return {k: rng.integers(3, vocab, v.shape, dtype=v.dtype) if k in TOKEN_KEYS else v for k, v in batch.items()}


def matmul_ceiling(tries: int = 3) -> dict:
    """FLOP/s of one 2048^3 float32 matmul, best of ``tries``, through each path podformer's CPU step
    can take: XLA's dot and, where built, the host BLAS (model/host_blas.py). The ceiling is the faster one."""
    x = jnp.ones((CEILING_N, CEILING_N), jnp.float32)
    paths = {"xla": jax.jit(lambda a: jnp.matmul(a, a))}
    if host_blas.loaded():
        paths["host_blas"] = jax.jit(lambda a: host_blas.matmul(a, a))
    rates = {}
    for name, f in paths.items():
        f(x).block_until_ready()
        best = float("inf")
        for _ in range(tries):
            t = time.perf_counter()
            f(x).block_until_ready()
            best = min(best, time.perf_counter() - t)
        rates[name] = 2 * CEILING_N**3 / best
    return {"ceiling_flops": max(rates.values()), **{f"ceiling_{k}_flops": v for k, v in rates.items()}}


class Bench:
    """One shape: per CPU path (model/kernels.py) a compiled train step and its own state (steps donate
    it), a synthetic batch on device and a loader."""

    def __init__(self, shape: Shape, extra: list[str], with_pipeline: bool = True, paths: tuple[str, ...] = ("xla",)):
        self.shape = shape
        name, _, _ = shape.config.partition(":")
        family = os.path.basename(name).removesuffix(".py")
        if not os.path.exists(os.path.join(os.path.dirname(HERE), name)):
            raise Skip(f"{shape.config} does not exist in this checkout")
        try:
            cfg, _ = config_lib.parse_args([*shape.overrides, *extra], shape.config, {})
        except UserError as e:
            raise Skip(f"{shape.config}: {e}") from None
        if cfg.model.family not in families.FAMILIES:
            raise Skip(f"model family {cfg.model.family!r} ({family}) is not in model/families.py")
        if shape.accelerator:  # per-device batch
            with cfg.unlocked():
                cfg.train.batch_size *= jax.device_count()
        row = families.FAMILIES[cfg.model.family]
        config_cls, module_cls = row.config, row.module_class()
        self.cfg, self.model_cfg = cfg, config_lib.family_config(cfg.model, config_cls)
        t = cfg.train
        self.mesh = mesh_lib.make_mesh(cfg.mesh)
        self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
        tx = optim.make_optimizer(cfg.opt, t.steps)

        def make(r):
            return module_cls(self.model_cfg, rngs=r)

        from podformer.data import pipeline
        from podformer.data.loader import Loader

        self.loader = None
        if with_pipeline:
            self.data = pipeline.build(cfg.data, vocab_size=self.model_cfg.vocab_size, seq_len=t.seq_len)
            self.loader = Loader(
                self.data.train_rows,
                global_batch=t.batch_size,
                mesh=self.mesh,
                rules=self.rules,
                seed=0,
                num_workers=cfg.data.num_workers,
                prefetch=cfg.data.prefetch,
            )
            layout = self.loader.host_batch(0)
        elif cfg.data.objective == "causal_lm":
            ones = np.ones((t.batch_size, t.seq_len), np.int32)
            positions = np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), ones.shape).copy()
            layout = dict(inputs=ones, targets=ones, segment_ids=ones, positions=positions, loss_weights=ones * 1.0)
        else:
            raise Skip(f"synthetic batches without the pipeline exist for causal_lm only, not {cfg.data.objective}")
        example = synthetic(layout, self.model_cfg.vocab_size)
        self.paths, self.step_fns, self.states, self.compile_s = paths, {}, {}, {}
        for path in paths:
            t0 = time.perf_counter()
            with kernels.use(path):  # traced (and compiled) on this path; the compiled step keeps it
                graphdef, self.states[path], shardings = trainer.create_state(make, tx, self.mesh, self.rules, t.seed)
                self.step_fns[path], bshard = trainer.compile_train_step(
                    graphdef, self.states[path], shardings, example, loss=LOSSES[cfg.data.objective], train_cfg=t,
                    mesh=self.mesh, rules=self.rules, schedule=optim.schedule(cfg.opt, t.steps),
                )  # fmt: skip
            self.compile_s[path] = time.perf_counter() - t0
        self.batch = {k: jax.device_put(v, bshard[k]) for k, v in example.items()}
        _, abstract = trainer.abstract_state(make, tx, 0)
        self.sizes = {k: int(np.prod(s)) for k, s in trainer.named_param_shapes(abstract).items()}
        try:
            self.flops_per_token = flops_lib.per_token(
                self.model_cfg, self.sizes, t.seq_len, flops_lib.decoder_len(example)
            )
        except AttributeError:  # a family podformer/flops.py does not know
            self.flops_per_token = float("nan")
        self.tokens_per_step = t.batch_size * t.seq_len
        self.loss = float("nan")

    def memory(self, path: str) -> dict:
        m = self.step_fns[path].memory_analysis()
        if m is None:
            return {}
        mib = 2.0**20
        peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return {
            "arguments_mib": m.argument_size_in_bytes / mib,
            "temporaries_mib": m.temp_size_in_bytes / mib,
            "peak_mib": peak / mib,
        }

    def steps(self, n: int, pipeline: bool, path: str | None = None) -> float:
        """Seconds per step over ``n`` steps of ``path`` (default: the first) dispatched back to back (as
        train.py does)."""
        path = path or self.paths[0]
        step_fn, state = self.step_fns[path], self.states[path]
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            jax.block_until_ready(state)
            t = time.perf_counter()
            for _ in range(n):
                batch = next(self.loader) if pipeline else self.batch
                state, metrics = step_fn(state, batch)
            jax.block_until_ready((state, metrics))
            elapsed = time.perf_counter() - t
        self.states[path] = state
        self.loss = float(metrics["loss"])
        return elapsed / n


class TorchWorker:
    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "torch_reference.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.proc.stdout.readline())

    def steps(self, n: int) -> float:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        times = json.loads(self.proc.stdout.readline())["times"]
        return sum(times) / len(times)  # the mean, as podformer's steps are timed (the whole run / n)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def run_shape(
    shape: Shape,
    *,
    steps: int,
    warmup: int,
    rounds: int,
    torch: bool,
    extra: list[str],
    paths: tuple[str, ...] = ("xla",),
) -> dict:
    """One shape's figures. The top-level ones are the first path's (XLA's by default); ``paths`` has
    every path's step time, tokens/s, MFU and speed over PyTorch, all from the same rounds."""
    b = Bench(shape, extra, paths=paths)
    on_cpu = jax.devices()[0].platform == "cpu"
    worker = TorchWorker() if torch and shape.torch_reference else None
    spec_peak, peak_source = flops_lib.peak_per_device(b.cfg.metrics.peak_tflops) if not on_cpu else (0.0, "")
    for path in paths:
        b.steps(warmup, pipeline=False, path=path)
    b.steps(warmup, pipeline=True)
    per_round = []
    try:
        for _ in range(rounds):
            r = {f"{path}_step_s": b.steps(steps, pipeline=False, path=path) for path in paths}
            r["synthetic_step_s"] = r[f"{paths[0]}_step_s"]
            if on_cpu:
                r.update(matmul_ceiling())
            if worker is not None:
                r["torch_step_s"] = worker.steps(steps)
            r["pipeline_step_s"] = b.steps(steps, pipeline=True)
            per_round.append(r)
    finally:
        if worker is not None:
            worker.close()
        b.loader.close()

    def med(key):
        return statistics.median(r[key] for r in per_round)

    def ratio(f):
        return statistics.median(f(r) for r in per_round)

    n_dev = jax.device_count()
    model_flops = lambda step_s: b.tokens_per_step / step_s * b.flops_per_token / n_dev  # noqa: E731

    def figures(path: str) -> dict:
        key = f"{path}_step_s"
        f = {
            "step_time_s": med(key),
            "tokens_per_sec": b.tokens_per_step / med(key),
            "model_tflops_per_device": model_flops(med(key)) / 1e12,
            "compile_s": b.compile_s[path],
        }
        if on_cpu:
            f["mfu"] = ratio(lambda r: model_flops(r[key]) / r["ceiling_flops"])
        else:
            f["mfu"] = model_flops(med(key)) / spec_peak
        if worker is not None:
            f["speedup_vs_torch"] = ratio(lambda r: r["torch_step_s"] / r[key])
        return f

    by_path = {path: figures(path) for path in paths}
    out = {
        "shape": shape.name,
        "kind": shape.kind,
        "config": shape.config,
        "overrides": [*shape.overrides, *extra],
        "devices": f"{n_dev} x {jax.devices()[0].device_kind}",
        "parameters": sum(b.sizes.values()),
        "flops_per_token": b.flops_per_token,
        "tokens_per_step": b.tokens_per_step,
        "path": paths[0],
        **by_path[paths[0]],
        "memory_per_device": b.memory(paths[0]),
        "host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": b.loss,
        "pipeline_step_time_s": med("pipeline_step_s"),
        "pipeline_over_synthetic": ratio(lambda r: r["pipeline_step_s"] / r["synthetic_step_s"]),
        "paths": {path: {**f, "memory_per_device": b.memory(path)} for path, f in by_path.items()},
        "rounds": per_round,
    }
    if on_cpu:
        out["matmul_ceiling_flops"] = med("ceiling_flops")
        out["matmul_ceiling_by_path_flops"] = {
            k.removeprefix("ceiling_").removesuffix("_flops"): med(k)
            for k in per_round[0]
            if k.startswith("ceiling_") and k != "ceiling_flops"
        }
        out["peak_source"] = f"measured float32 {CEILING_N}^3 matmul, faster of XLA and host BLAS, same run"
    else:
        out["peak_source"] = peak_source
    if worker is not None:
        out["torch"] = {**worker.info, "step_time_s": med("torch_step_s")}
        out["torch"]["tokens_per_sec"] = b.tokens_per_step / med("torch_step_s")
    return out


def machine() -> dict:
    info = {
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "host_malloc_tuned": hostmem.keep_freed_memory(),
    }
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        info["load_average_at_start"] = os.getloadavg()[0]
    except (OSError, StopIteration):
        pass
    # The host path's speed is numpy's OpenBLAS's: which kernels it runs (OPENBLAS_CORETYPE can pin older ones).
    info["openblas_coretype_env"] = os.environ.get("OPENBLAS_CORETYPE")
    try:
        import threadpoolctl

        blas = [i for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
        info["numpy_openblas"] = (
            {k: blas[0].get(k) for k in ("version", "architecture", "num_threads")} if blas else None
        )
    except ImportError:
        pass
    return info


PATH_NAMES = {"xla": "XLA's ops", "blas": "host BLAS"}


def print_row(r: dict) -> None:
    line = f"{r['shape']:>24}: pipeline/synthetic {r['pipeline_over_synthetic']:.2f}"
    line += f"  peak {r['memory_per_device'].get('peak_mib', float('nan')):.0f} MiB/dev"
    if "torch" in r:
        line += f"  PyTorch eager {r['torch']['tokens_per_sec']:.0f} tok/s"
    for path, f in r.get("paths", {r.get("path", "xla"): r}).items():
        line += (
            f"\n{PATH_NAMES.get(path, path):>24}: {f['step_time_s'] * 1e3:7.1f} ms/step "
            f"{f['tokens_per_sec']:8.0f} tok/s "
            f"{f['model_tflops_per_device']:6.3f} TFLOP/s/dev  MFU {f['mfu']:5.1%}  compile {f['compile_s']:.0f}s"
        )
        if "speedup_vs_torch" in f:
            line += f"  {f['speedup_vs_torch']:.2f}x PyTorch"
    print(line, flush=True)


# Figures that get a median over runs (--runs): each run is a fresh process pair.
PER_RUN = (
    "step_time_s",
    "tokens_per_sec",
    "model_tflops_per_device",
    "pipeline_step_time_s",
    "pipeline_over_synthetic",
    "mfu",
    "matmul_ceiling_flops",
    "speedup_vs_torch",
    "compile_s",
)


def combine_runs(reports: list[dict]) -> list[dict]:
    """Per shape: the first run's fixed fields (config, sizes, memory), each figure's median over the
    runs, and every run's own figures and rounds under ``runs``."""
    shapes = []
    for i, first in enumerate(reports[0]["shapes"]):
        runs = [r["shapes"][i] for r in reports]
        if "skipped" in first:
            shapes.append(first)
            continue
        merged = {k: v for k, v in first.items() if k != "rounds"}
        for k in PER_RUN:
            if k in first:
                merged[k] = statistics.median(r[k] for r in runs)
        if "paths" in first:
            merged["paths"] = {}  # a new dict: first["paths"] stays that run's own, under "runs"
        for path, figures in first.get("paths", {}).items():
            merged["paths"][path] = {
                k: statistics.median(r["paths"][path][k] for r in runs) if k in PER_RUN else v
                for k, v in figures.items()
            }
        if "torch" in first:
            merged["torch"] = {
                **first["torch"],
                "step_time_s": statistics.median(r["torch"]["step_time_s"] for r in runs),
                "tokens_per_sec": statistics.median(r["torch"]["tokens_per_sec"] for r in runs),
            }
        merged["runs"] = [
            {**{k: r[k] for k in PER_RUN if k in r}, "paths": r.get("paths"), "rounds": r["rounds"]} for r in runs
        ]
        shapes.append(merged)
    return shapes


def run_in_fresh_processes(args, extra: list[str]) -> list[dict]:
    """``args.runs`` runs of this script, one after another, each in its own process (and PyTorch's
    in its own): the same code differs by up to ~20% in step time between processes on a CPU (memory
    placement), so one process pair is one draw and the medians over runs are what to compare."""
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = os.path.join(tmp, f"run{i}.json")
            argv = ["--shapes", args.shapes, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            argv += ["--rounds", str(args.rounds), "--out", out, *(["--torch"] if args.torch else []), *extra]
            argv += ["--paths", args.paths]
            print(f"run {i + 1} of {args.runs} (a fresh process):", flush=True)
            subprocess.run([sys.executable, os.path.abspath(__file__), *argv], check=True)
            with open(out) as f:
                reports.append(json.load(f))
    return reports


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="", help="comma-separated names from benchmarks/shapes.py; default: the suite")
    p.add_argument("--steps", type=int, default=5, help="train steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over rounds are reported")
    p.add_argument("--torch", action="store_true", help="also time benchmarks/torch_reference.py (decoder-cpu)")
    p.add_argument("--runs", type=int, default=1, help="repeat in fresh processes; medians over runs are reported")
    p.add_argument("--out", default=os.path.join(HERE, "results", "throughput.json"))
    p.add_argument(
        "--paths",
        default="",
        help="comma-separated CPU paths of model/kernels.py to time side by side: xla (the default path), blas "
        "(the opt-in host BLAS); default: both on a CPU, xla elsewhere",
    )
    args, extra = p.parse_known_args()
    on_cpu = jax.devices()[0].platform == "cpu"
    args.paths = args.paths or ("xla,blas" if on_cpu else "xla")
    paths = tuple(x for x in args.paths.split(",") if x)
    if any(x not in kernels.MODES for x in paths) or not paths:
        p.error(f"--paths={args.paths}: choose from {', '.join(kernels.MODES)}")
    if "blas" in paths and not (on_cpu and host_blas.load()):  # load() has said why not
        paths = tuple(x for x in paths if x != "blas") or ("xla",)
        args.paths = ",".join(paths)
    if args.runs > 1:
        reports = run_in_fresh_processes(args, extra)
        report = {**reports[0], "command": " ".join(sys.argv), "runs": args.runs, "shapes": combine_runs(reports)}
        report["machine"]["load_average_at_end"] = reports[-1]["machine"].get("load_average_at_end")
        print(f"medians over {args.runs} runs:")
        for r in report["shapes"]:
            if "skipped" not in r:
                print_row(r)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
        return
    on_accelerator = jax.devices()[0].platform != "cpu"
    names = [s for s in args.shapes.split(",") if s] or [s.name for s in SHAPES if s.accelerator == on_accelerator]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(BY_NAME)}")
    report = {"benchmark": "throughput", "command": " ".join(sys.argv), "machine": machine(), "shapes": []}
    for name in names:
        try:
            r = run_shape(
                BY_NAME[name],
                steps=args.steps,
                warmup=args.warmup,
                rounds=args.rounds,
                torch=args.torch,
                extra=extra,
                paths=paths,
            )
        except Skip as e:
            print(f"{name:>24}: skipped: {e}", flush=True)
            report["shapes"].append({"shape": name, "skipped": str(e)})
            continue
        report["shapes"].append(r)
        print_row(r)
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
