"""One H200 (or H100): a 1.3B GPT decoder in bf16 with cuDNN fused attention; MFU against the bf16
matmul rate measured on the same GPU. Prepared without a GPU to run on: see the README's Performance
section for whether it has been run.

    python benchmarks/gpu_h200.py                          # -> benchmarks/results/gpu_h200.json
    python benchmarks/gpu_h200.py --batch=16 --remat=save_dots

The model is GPT-3 XL's shape (d_model 2048, 24 layers, 16 heads of 128, MLP 8192, 2048 tokens; 1.3B
parameters with a 50304-token vocabulary): float32 master weights and AdamW state, bf16 compute, float32
softmax and loss, scanned layers, cuDNN attention. Tokens are synthetic (the embedded corpus is too
small to train a 50k tokenizer quickly). The ceiling is the best of 10 bf16 8192^3 matmuls with float32
accumulation -- what the tensor cores deliver through XLA -- next to the spec sheet's 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# XLA GPU flags MaxText uses on one host: overlap independent work; let cuBLAS/cuDNN take the GEMMs.
os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.shapes import Shape, _o  # noqa: E402
from benchmarks.throughput import Bench  # noqa: E402
from podformer import flops as flops_lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def bf16_matmul_rate(n: int = 8192, tries: int = 10) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="sequences of 2048 tokens per step")
    p.add_argument("--remat", default="none", help="none | full | save_dots | save_dots_and_offload")
    p.add_argument("--attention", default="cudnn", help="cudnn | xla")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gpu_h200.json"))
    args = p.parse_args()
    if jax.devices()[0].platform != "gpu":
        print(f"no GPU here ({jax.devices()[0].platform}); this benchmark needs an H200/H100", file=sys.stderr)
        sys.exit(2)
    shape = Shape(
        "decoder-1.3b-gpu",
        "decoder",
        "configs/gpt.py:gpt2_xl",
        _o(
            model__vocab_size=50304,
            model__max_len=2048,
            model__d_model=2048,
            model__num_layers=24,
            model__num_heads=16,
            model__d_ff=8192,
            model__dtype="bfloat16",
            model__attention_impl=args.attention,
            model__remat=args.remat,
            model__scan_layers="true",
            train__seq_len=2048,
            train__batch_size=args.batch * jax.device_count(),
        ),
    )
    b = Bench(shape, [], with_pipeline=False)
    print(f"compiled in {b.compile_s:.0f} s; {sum(b.sizes.values()) / 1e9:.2f}B parameters; memory {b.memory()}")
    b.steps(2, pipeline=False)
    rounds = []
    for _ in range(args.rounds):
        step = b.steps(args.steps, pipeline=False)
        rounds.append({"step_s": step, "matmul_flops": bf16_matmul_rate()})
    step = statistics.median(r["step_s"] for r in rounds)
    ceiling = max(r["matmul_flops"] for r in rounds)
    model_flops = b.tokens_per_step / step * b.flops_per_token / jax.device_count()
    spec, source = flops_lib.peak_per_device()
    report = {
        "device": jax.devices()[0].device_kind,
        "parameters": sum(b.sizes.values()),
        "tokens_per_step": b.tokens_per_step,
        "step_time_s": step,
        "tokens_per_sec": b.tokens_per_step / step,
        "model_tflops_per_device": model_flops / 1e12,
        "bf16_matmul_tflops": ceiling / 1e12,
        "mfu_vs_measured_matmul": model_flops / ceiling,
        "mfu_vs_spec_sheet": model_flops / spec,
        "spec_sheet_source": source,
        "memory_per_device": b.memory(),
        "compile_s": b.compile_s,
        "final_loss": b.loss,
        "args": vars(args),
        "rounds": rounds,
    }
    print(
        f"{report['tokens_per_sec']:,.0f} tokens/s, {report['model_tflops_per_device']:.0f} TFLOP/s: "
        f"{report['mfu_vs_measured_matmul']:.1%} of the measured bf16 matmul rate "
        f"({report['bf16_matmul_tflops']:.0f} TFLOP/s), {report['mfu_vs_spec_sheet']:.1%} of the spec sheet "
        f"(target: 50% of the measured rate)"
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
