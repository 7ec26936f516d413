"""Sentence embeddings and semantic search with an encoder (a podformer workdir or a Hugging Face folder).

    python -m podformer.embed --model=all-MiniLM-L6-v2/ --queries=queries.txt --passages=passages.txt
    python -m podformer.embed --model=runs/bert_tiny --query="what's the main objective of curling?" \\
        --passage="Curling is ..." --passage="..." --npy=embeddings/

Embeddings are pooled last hidden states (the folder's sentence-transformers pooling when it has one --
mean, CLS or max --, else mean over the real tokens), L2-normalised, so a dot product is the cosine. The
texts are batched, each batch split over the devices (a data mesh); ``--pooling`` overrides.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from podformer import generate_cli
from podformer.core.errors import UserError
from podformer.data import hf_tokenizer
from podformer.model import bert

POOLING = ("mean", "cls", "max")
USAGE = """usage: python -m podformer.embed --model=WORKDIR_OR_HF_FOLDER
    (--queries=FILE | --query=TEXT ...) (--passages=FILE | --passage=TEXT ...)
    [--pooling=mean|cls|max] [--top=5] [--batch_size=32] [--npy=DIR] [--step=N|best]"""


def _st_file(path: str, name: str) -> dict | None:
    """A sentence-transformers file of a folder, or of the folder a workdir was imported from (hf_files/)."""
    for where in (path, os.path.join(path, "hf_files")):
        if os.path.isfile(os.path.join(where, name)):
            with open(os.path.join(where, name)) as f:
                return json.load(f)
    return None


def pooling_of(path: str) -> str:
    """The pooling the model was trained to be read with: its 1_Pooling/config.json, else mean."""
    modules = _st_file(path, "modules.json") or []
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = _st_file(path, os.path.join(m["path"], "config.json")) or {}
            for mode in POOLING:
                key = "pooling_mode_cls_token" if mode == "cls" else f"pooling_mode_{mode}_tokens"
                if cfg.get(key):
                    return mode
    return "mean"


def max_length(path: str, model) -> int:
    st = _st_file(path, "sentence_bert_config.json") or {}
    return int(st.get("max_seq_length") or model.cfg.max_len)


def embed(loaded, texts: list[str], *, pooling: str = "mean", batch_size: int = 32, max_len: int = 512) -> np.ndarray:
    """(len(texts), D) float32 unit vectors."""
    if pooling not in POOLING:
        raise UserError(f"--pooling={pooling!r}: choose one of {', '.join(POOLING)}")
    if not isinstance(loaded.model, bert.Bert):
        raise UserError(f"embeddings need an encoder (a BERT-family model), not {type(loaded.model).__name__}")
    tok = loaded.tokenizer
    if isinstance(tok, hf_tokenizer.HFTokenizer):
        tok.tok.enable_truncation(max_len)
    rows = []
    for t in texts:
        ids = loaded.encode(t)
        rows.append(ids[: max_len - 1] + ids[-1:] if len(ids) > max_len else ids)  # keep the closing token
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    graphdef, state = nnx.split(loaded.model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))  # parameters on every device
    step = -(-batch_size // len(devices)) * len(devices)  # rows per batch: a multiple of the devices
    out = []
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        L = max(len(r) for r in chunk)
        ids = np.full((step, L), loaded.pad_id, np.int32)
        mask = np.zeros((step, L), np.int32)
        mask[:, 0] = 1  # padding rows: one token, so no row is empty; dropped below
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        batch = jax.device_put((ids, mask), NamedSharding(mesh, PartitionSpec("data")))
        out.append(np.asarray(_embed(graphdef, state, *batch, pooling=pooling))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, loaded.model.cfg.d_model), np.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _embed(graphdef, state, ids, mask, *, pooling):
    model = nnx.merge(graphdef, state)
    hidden = model.encode(ids, mask, jnp.zeros_like(ids)).astype(jnp.float32)
    real = mask[:, :, None].astype(jnp.float32)
    if pooling == "mean":  # sentence-transformers': sum over real tokens / their count (at least 1e-9)
        pooled = (hidden * real).sum(axis=1) / jnp.maximum(real.sum(axis=1), 1e-9)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = jnp.where(real > 0, hidden, -1e9).max(axis=1)
    # torch.nn.functional.normalize: x / max(||x||, 1e-12)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def rank(queries: np.ndarray, passages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, scores): passages by descending cosine for each query (ties by index)."""
    scores = queries @ passages.T
    return np.argsort(-scores, axis=1, kind="stable"), scores


def _texts(values: list[str], file: str | None, what: str) -> list[str]:
    if file is not None:
        if not os.path.isfile(file):
            raise UserError(f"--{what}s={file}: no such file (one text per line)")
        with open(file, encoding="utf-8") as f:
            values = values + [line.strip() for line in f if line.strip()]
    if not values:
        raise UserError(f"no {what}s: give --{what}s=FILE or --{what}=TEXT\n{USAGE}")
    return values


def run(argv: list[str]) -> dict:
    single = {"model", "queries", "passages", "pooling", "top", "batch_size", "npy", "step"}
    flags, texts = {}, {"query": [], "passage": []}
    for a in argv:
        name, eq, value = a[2:].partition("=")
        if not a.startswith("--") or not eq or name not in single | set(texts):
            raise UserError(f"unknown argument {a!r}\n{USAGE}")
        if name in texts:
            texts[name].append(value)
        else:
            flags[name] = value
    if "model" not in flags:
        raise UserError(f"--model is required\n{USAGE}")
    queries = _texts(texts["query"], flags.get("queries"), "query")
    passages = _texts(texts["passage"], flags.get("passages"), "passage")
    try:
        top, batch_size = int(flags.get("top", 5)), int(flags.get("batch_size", 32))
        step = flags.get("step")
    except ValueError as e:
        raise UserError(f"--top and --batch_size take integers ({e})") from None
    path = flags["model"]
    loaded = generate_cli.load(path, step)
    pooling = flags.get("pooling") or pooling_of(path)
    kw = dict(pooling=pooling, batch_size=batch_size, max_len=max_length(path, loaded.model))
    q, p = embed(loaded, queries, **kw), embed(loaded, passages, **kw)
    order, scores = rank(q, p)
    for i, text in enumerate(queries):
        print(f"query: {text}")
        for j in order[i][:top]:
            print(f"  {scores[i, j]:.4f}  {passages[j]}")
    if "npy" in flags:
        os.makedirs(flags["npy"], exist_ok=True)
        np.save(os.path.join(flags["npy"], "queries.npy"), q)
        np.save(os.path.join(flags["npy"], "passages.npy"), p)
        print(f"embeddings ({pooling} pooling, normalised): {flags['npy']}/queries.npy, passages.npy")
    return {"queries": q, "passages": p, "order": order, "scores": scores, "pooling": pooling}


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
