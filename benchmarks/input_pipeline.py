"""Input-pipeline throughput per pretraining objective: host batches per second through the real loader.

Builds a synthetic English-like corpus (a folder of .txt files, converted to ArrayRecord and tokenized
once, like any local corpus), then times ``Loader.host_batch`` -- row reads, the objective's random
transform and stacking -- for each objective, single process (``--workers`` adds grain processes).

    python benchmarks/input_pipeline.py                           # -> benchmarks/results/input_pipeline.json
    python benchmarks/input_pipeline.py --seq-len=512 --batch=64 --workers=4

``--build`` times building the stores instead, stage by stage (reading the ArrayRecord documents,
sentence splitting, tokenizing, writing) and whole for 1, 2 and all worker processes, in MB/s of raw
text, next to SentencePiece's own batch encode of the same text:

    python benchmarks/input_pipeline.py --build --files=/tmp/corpus100 --max-mb=20
        # -> benchmarks/results/input_pipeline_build.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from podformer.configs import gpt  # noqa: E402
from podformer.configs.common import RULES  # noqa: E402
from podformer.data import pipeline, shards, sources, store, tokenizer, tokens  # noqa: E402
from podformer.data.loader import Loader  # noqa: E402

OBJECTIVES = ("causal_lm", "mlm", "roberta", "mlm_nsp", "mlm_sop", "span_corruption", "prefix_lm", "bart")
WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so what no more out up into do time "
    "river model language training data system people world between because through example"
).split()


def _corpus(root: str, docs: int) -> None:
    r = random.Random(0)
    for f in range(8):
        with open(os.path.join(root, f"part{f}.txt"), "w") as fh:
            for _ in range(docs // 8):
                sentences = (
                    " ".join(r.choice(WORDS) for _ in range(r.randint(5, 25))).capitalize() + "."
                    for _ in range(r.randint(3, 30))
                )
                fh.write(" ".join(sentences) + "\n\n")


def _rate(nbytes: int, fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return round(nbytes / (time.perf_counter() - t) / 1e6, 2), out


def build_benchmark(args, work: str, tok_path: str) -> dict:
    """MB/s of raw text per stage (one process) and per whole build (1, 2, all workers)."""
    src = sources.Files(args.files or f"{work}/corpus", doc_split="file", cache_dir=work)
    docs = src.documents("train")
    n, total = 0, 0
    while n < len(docs) and total < args.max_mb * 1e6:
        total += len(docs[n].encode("utf-8"))
        n += 1
    tok = tokenizer.SentencePieceTokenizer.load(tok_path)
    texts = docs[:n]
    res = {"documents": n, "mb": round(total / 1e6, 1), "cores": os.cpu_count(), "load_average": os.getloadavg()}
    res["read"], _ = _rate(total, lambda: sources.Files(src.pattern, cache_dir=work).documents("train")[:n])
    res["split"], _ = _rate(total, lambda: [store.split_sentences(t) for t in texts])
    for th in (1, os.cpu_count()):
        res[f"sentencepiece_batch_encode_{th}_threads"], _ = _rate(total, tok.encode_batch, texts, th)
        res[f"sentencepiece_newline_pieces_{th}_threads"], _ = _rate(total, shards._encode, tok, texts, th)
    job = shards.Job(texts, tok, "tokens", "uint16", tok.bos_id, tok.eos_id)
    plan = shards.plan(n)
    res["tokenize_shards_1_process"], arrays = _rate(total, lambda: [shards.encode_shard(job, *r) for r in plan])
    os.makedirs(f"{work}/parts")
    res["write"], _ = _rate(total, lambda: [shards._write_shard(f"{work}/parts", k, *a) for k, a in enumerate(arrays)])
    kw = dict(vocab_size=tok.vocab_size, progress=False)
    for w in sorted({1, 2, os.cpu_count()}):
        b = dict(bos_id=tok.bos_id, eos_id=tok.eos_id)
        res[f"token_store_{w}_workers"], _ = _rate(
            total, tokens.build, f"{work}/t{w}", texts, tok, workers=w, **b, **kw
        )
        res[f"sentence_store_{w}_workers"], _ = _rate(
            total, store.build, f"{work}/s{w}", texts, tok, name="b", workers=w, **kw
        )
    for k, v in res.items():
        print(f"{k:40s} {v}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--vocab-size", type=int, default=520)
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--build", action="store_true", help="time the store build instead of the loader")
    p.add_argument("--files", default="", help="--build: a folder of .txt files (default: the synthetic corpus)")
    p.add_argument("--tokenizer", default="", help="--build: a SentencePiece model (default: trained here)")
    p.add_argument("--max-mb", type=float, default=20.0, help="--build: MB of text timed")
    p.add_argument("--out", default="")
    args = p.parse_args()
    results_dir = os.path.join(os.path.dirname(__file__), "results")
    args.out = args.out or os.path.join(
        results_dir, "input_pipeline_build.json" if args.build else "input_pipeline.json"
    )
    work = tempfile.mkdtemp(prefix="podformer-bench-")
    os.makedirs(os.path.join(work, "corpus"))
    _corpus(os.path.join(work, "corpus"), args.docs)
    tok = os.path.join(work, "all.model")
    if args.tokenizer:
        tok = args.tokenizer
    else:
        tokenizer.main(["train", f"--source=files:{args.files or work + '/corpus'}", "--family=all",
                        f"--vocab-size={args.vocab_size}", f"--output={tok}"])  # fmt: skip
    if args.build:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(build_benchmark(args, work, tok), f, indent=2)
        print(f"wrote {args.out}")
        return
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])  # fmt: skip
    results = {"seq_len": args.seq_len, "batch": args.batch, "workers": args.workers, "objectives": {}}
    for objective in args.objectives.split(","):
        cfg = gpt.get_config("tiny").data
        cfg.source, cfg.files, cfg.doc_split, cfg.objective = "files", f"{work}/corpus", "blank_line", objective
        cfg.cache_dir, cfg.tokenizer = work, tok
        data = pipeline.build(cfg, vocab_size=args.vocab_size, seq_len=args.seq_len)
        loader = Loader(data.train_rows, global_batch=args.batch, mesh=mesh, rules=RULES, num_workers=args.workers)
        # With workers, iterate the loader (grain processes + prefetch); without, read batches directly.
        fetch = (lambda step, it=loader: next(it)) if args.workers else loader.host_batch
        fetch(0)  # warm up (starts the workers)
        t = time.perf_counter()
        for step in range(1, args.steps + 1):
            fetch(step)
        dt = time.perf_counter() - t
        loader.close()
        rate = args.steps * args.batch / dt
        results["objectives"][objective] = {"examples_per_s": round(rate, 1), "rows_per_epoch": len(data.train_rows)}
        print(f"{objective:16s} {rate:10.1f} examples/s  ({len(data.train_rows):,} rows/epoch)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
