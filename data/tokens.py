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
        counts = np.bincount(np.asarray(self.tokens), minlength=1).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())


def build(
    path: str,
    texts: Sequence[str],
    encode_batch: Callable[[Sequence[str]], list[list[int]]],
    *,
    vocab_size: int,
    bos_id: int | None,
    eos_id: int | None,
    meta: dict | None = None,
    chunk: int = 512,
) -> TokenStore:
    """Tokenize ``texts`` into a store at ``path`` (written to a temporary directory, then renamed, so a
    killed build never leaves a half-written store behind)."""
    if not texts:
        raise UserError(f"cannot build token store {path}: the corpus has no documents")
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    parts, lengths = [], []
    for i in range(0, len(texts), chunk):
        for ids in encode_batch(texts[i : i + chunk]):
            doc = ([bos_id] if bos_id is not None else []) + list(ids) + ([eos_id] if eos_id is not None else [])
            parts.append(np.asarray(doc, dtype=dtype))
            lengths.append(len(doc))
    tokens = np.concatenate(parts)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    np.save(os.path.join(tmp, "tokens.npy"), tokens)
    np.save(os.path.join(tmp, "doc_starts.npy"), doc_starts)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**(meta or {}), "num_tokens": int(tokens.shape[0]), "num_docs": len(lengths)}, f)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished the same store first
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore(path)


def cached(path: str, texts_fn: Callable[[], Sequence[str]], **build_kwargs) -> TokenStore:
    if os.path.exists(os.path.join(path, "meta.json")):
        return TokenStore(path)
    return build(path, texts_fn(), **build_kwargs)
