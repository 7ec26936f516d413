"""Token stores: a corpus tokenized once into one flat array plus document boundaries, memory-mapped.

Every training row is then a cheap random-access slice, so the loader can jump to any step (exact
resume, and the same global batches under any number of hosts) without replaying the stream.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from podformer.core.errors import UserError
from podformer.data import shards


class TokenStore:
    """``tokens[doc_starts[d]:doc_starts[d+1]]`` is document d (with its BOS/EOS, if added)."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.tokens = np.load(os.path.join(path, "tokens.npy"), mmap_mode="r")
        self.doc_starts = np.load(os.path.join(path, "doc_starts.npy"))

    def __reduce__(self):  # grain's worker processes reopen the memory map instead of copying it
        return (TokenStore, (self.path,))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_starts.shape[0] - 1)

    def doc_of(self, index: np.ndarray | int) -> np.ndarray:
        """Document index of token position(s) ``index``."""
        return np.searchsorted(self.doc_starts, index, side="right") - 1

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the corpus' token frequencies: the loss of the best context-free model."""
        return entropy(token_counts(self.tokens))


COUNT_CHUNK = 1 << 22  # tokens counted at a time: bincount's int64 copy of a chunk is 32 MiB


def token_counts(tokens: np.ndarray, chunk: int = COUNT_CHUNK) -> np.ndarray:
    """How often each token id occurs in a (memory-mapped) token array, read a chunk at a time, so the
    memory it takes is bounded whatever the corpus size (one bincount of the whole array would make an
    int64 copy: 8 bytes a token, 2.9 TB for C4's 360 GB of uint16 tokens)."""
    counts = np.zeros(1, np.int64)
    for at in range(0, len(tokens), chunk):
        c = np.bincount(np.asarray(tokens[at : at + chunk]))
        if len(c) > len(counts):
            counts = np.pad(counts, (0, len(c) - len(counts)))
        counts[: len(c)] += c
    return counts


def entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the distribution proportional to ``counts``."""
    counts = np.asarray(counts, np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class CallableTokenizer:
    """A bare ``encode_batch`` function as a tokenizer (tests; a lambda cannot go to worker processes)."""

    def __init__(self, fn: Callable[[Sequence[str]], list[list[int]]]):
        self.fn = fn

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return [list(x) for x in self.fn(list(texts))]


def as_tokenizer(encoder):
    return encoder if hasattr(encoder, "encode_batch") else CallableTokenizer(encoder)


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def finish(path: str, tmp: str, meta: dict) -> None:
    """Write ``meta.json`` last into ``tmp`` and rename it to ``path``; the shards' folder goes too."""
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same store first
        shutil.rmtree(tmp, ignore_errors=True)


def build(
    path: str,
    texts: Sequence[str],
    encoder,
    *,
    vocab_size: int,
    bos_id: int | None,
    eos_id: int | None,
    meta: dict | None = None,
    name: str = "",
    keep_parts: bool = False,
    **parallel,
) -> TokenStore:
    """Tokenize ``texts`` into a store at ``path``: shards built in parallel and resumably in
    ``<path>.parts`` (data/shards.py; ``parallel``: workers, process_index, process_count, progress), then
    concatenated into a temporary directory that is renamed, so a store is whole or absent."""
    if not len(texts):
        raise UserError(f"cannot build token store {path}: the corpus has no documents")
    dtype = dtype_for(vocab_size)
    job = shards.Job(texts, as_tokenizer(encoder), "tokens", np.dtype(dtype).name, bos_id, eos_id)
    parts = path + ".parts"
    plan = shards.build_parts(parts, job, name=name or os.path.basename(path), **parallel)
    if parallel.get("own_only"):
        return None
    if os.path.exists(os.path.join(path, "meta.json")):  # another process assembled it meanwhile
        return TokenStore(path)
    lengths = np.concatenate([shards.load_shard(parts, k, "lengths")["lengths"] for k in range(len(plan))])
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        out = np.lib.format.open_memmap(os.path.join(tmp, "tokens.npy"), "w+", dtype, (int(doc_starts[-1]),))
        at = 0
        for k in range(len(plan)):
            t = shards.load_shard(parts, k, "tokens")["tokens"]
            out[at : at + len(t)] = t
            at += len(t)
        out.flush()
        del out
        np.save(os.path.join(tmp, "doc_starts.npy"), doc_starts)
        finish(path, tmp, {**(meta or {}), "num_tokens": int(doc_starts[-1]), "num_docs": len(lengths)})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_parts and parallel.get("process_count", 1) == 1:  # other hosts may still read them
        shutil.rmtree(parts, ignore_errors=True)
    return TokenStore(path)


def cached(path: str, texts_fn: Callable[[], Sequence[str]], **build_kwargs) -> TokenStore:
    if os.path.exists(os.path.join(path, "meta.json")):
        return TokenStore(path)
    try:
        return build(path, texts_fn(), **build_kwargs)
    except (FileNotFoundError, RuntimeError):
        # Another process (a second run, a host on a shared cache) finished the same store and removed
        # the shards this one was reading: the store it wrote is this one's, bit for bit.
        if os.path.exists(os.path.join(path, "meta.json")):
            return TokenStore(path)
        raise
