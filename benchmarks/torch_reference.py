"""A plain PyTorch (eager) GPT-2-style decoder: the CPU reference the benchmarks compare against.

Not part of podformer. Same architecture and shapes as podformer's GPT (pre-LayerNorm, learned
positions, tanh GELU, tied embeddings, AdamW), float32, synthetic tokens.

    python benchmarks/torch_reference.py --steps 10
"""

from __future__ import annotations

import argparse
import json
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

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.T


def run(vocab=32000, seq=256, d=256, layers=4, heads=4, ff=1024, batch=8, steps=10, warmup=2, threads=0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(vocab, seq, d, layers, heads, ff)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    step = times[len(times) // 2]
    return {
        "impl": "pytorch-eager",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "step_time_s": step,
        "tokens_per_sec": batch * seq / step,
        "loss": float(loss),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    print(json.dumps(run(steps=args.steps)))
