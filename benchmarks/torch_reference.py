"""A plain PyTorch (eager) GPT-2-style decoder: the CPU reference the benchmarks compare against.

Not part of podformer. Same architecture and shapes as podformer's GPT (pre-LayerNorm, learned
positions, tanh GELU, tied embeddings, AdamW), float32, synthetic tokens.

    python benchmarks/torch_reference.py --steps 10
    python benchmarks/torch_reference.py --serve     # for benchmarks/throughput.py: rounds on request

``--serve`` builds the model once, then reads a step count per line on stdin and answers each with a
JSON line of step times, so the benchmark can interleave PyTorch and podformer rounds under the same
machine load (the other process waits on a blocking read meanwhile and uses no CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, layers: int, heads: int, ff: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads, ff) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        for m in self.modules():  # GPT-2's initialisation, as podformer's (the speed does not depend on it)
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.T


class Trainer:
    def __init__(self, vocab=32000, seq=256, d=256, layers=4, heads=4, ff=1024, batch=8, threads=0):
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.vocab = vocab
        self.model = GPT(vocab, seq, d, layers, heads, ff)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids = torch.randint(0, vocab, (batch, seq + 1))
        self.loss = float("nan")

    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            logits = self.model(self.ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, self.vocab), self.ids[:, 1:].reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            times.append(time.perf_counter() - t)
        self.loss = float(loss.detach())
        return times


def serve() -> None:
    trainer = Trainer()
    trainer.steps(2)  # warm-up: allocator and thread pool
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        times = trainer.steps(int(line))
        print(json.dumps({"times": times, "loss": trainer.loss}), flush=True)


def run(vocab=32000, seq=256, d=256, layers=4, heads=4, ff=1024, batch=8, steps=10, warmup=2, threads=0) -> dict:
    trainer = Trainer(vocab, seq, d, layers, heads, ff, batch, threads)
    trainer.steps(warmup)
    times = sorted(trainer.steps(steps))
    step = times[len(times) // 2]
    return {
        "impl": "pytorch-eager",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_time_s": step,
        "tokens_per_sec": batch * seq / step,
        "loss": trainer.loss,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--serve", action="store_true", help="answer step counts on stdin with JSON step times")
    args = p.parse_args()
    if args.serve:
        serve()
    else:
        print(json.dumps(run(steps=args.steps)))
