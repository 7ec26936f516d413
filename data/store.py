"""Sentence stores: documents split into sentences, tokenized once into flat memory-mapped arrays.

``tokens[sent_starts[s]:sent_starts[s+1]]`` is sentence s and ``doc_starts`` (a subset of
``sent_starts``) marks where each document begins; no BOS/EOS or separators are stored -- each
objective adds its own. Every row an objective builds is then a random-access slice, which is what
lets the loader jump to any step. Built in bounded memory (documents are read, split and tokenized a
chunk at a time and appended to files), into a temporary directory that is renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np

from podformer.core.errors import UserError
from podformer.data import shards, tokens
from podformer.data.sentences import split_sentences  # noqa: F401 (callers find it here too)

FORMAT = "sentences-v1"


class SentenceStore:
    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=self.meta["dtype"], mode="r")
        self.sent_starts = np.load(os.path.join(path, "sent_starts.npy"))
        self.doc_starts = np.load(os.path.join(path, "doc_starts.npy"))
        # Index of each document's first sentence, and of each sentence's document.
        self.doc_first_sentence = np.searchsorted(self.sent_starts, self.doc_starts)

    def __reduce__(self):  # worker processes reopen the files instead of receiving a copy of them
        return (SentenceStore, (self.path,))

    @property
    def num_tokens(self) -> int:
        return int(self.sent_starts[-1])

    @property
    def num_docs(self) -> int:
        return len(self.doc_starts) - 1

    @property
    def num_sentences(self) -> int:
        return len(self.sent_starts) - 1

    def doc_of_sentence(self, s) -> np.ndarray:
        return np.searchsorted(self.doc_first_sentence, s, side="right") - 1

    def doc_of_token(self, t) -> np.ndarray:
        return np.searchsorted(self.doc_starts, t, side="right") - 1

    def token_range(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.tokens[start:stop], dtype=np.int32)

    def sentences(self, first: int, last: int) -> list[np.ndarray]:
        """Sentences ``first .. last-1`` as int32 arrays."""
        flat = self.token_range(int(self.sent_starts[first]), int(self.sent_starts[last]))
        return np.split(flat, self.sent_starts[first + 1 : last] - self.sent_starts[first])

    def unigram_entropy(self) -> float:
        return tokens.entropy(tokens.token_counts(self.tokens))


def build(
    path: str,
    documents: Sequence[str],
    encoder,
    *,
    vocab_size: int,
    name: str,
    meta: dict | None = None,
    keep_parts: bool = False,
    **parallel,
) -> SentenceStore:
    """Split ``documents`` into sentences and tokenize them into a store at ``path`` (in parallel and
    resumably, as data/tokens.py's ``build``)."""
    dtype = tokens.dtype_for(vocab_size)
    job = shards.Job(documents, tokens.as_tokenizer(encoder), "sentences", np.dtype(dtype).name)
    parts = path + ".parts"
    plan = shards.build_parts(parts, job, name=name, **parallel) if len(documents) else []
    if parallel.get("own_only"):
        return None
    if os.path.exists(os.path.join(path, "meta.json")):  # another process assembled it meanwhile
        return SentenceStore(path)
    small = [shards.load_shard(parts, k, "sent_lengths", "counts") for k in range(len(plan))]
    sent_lengths = np.concatenate([np.zeros(0, np.int64)] + [z["sent_lengths"] for z in small])
    counts = np.concatenate([np.zeros(0, np.int64)] + [z["counts"] for z in small])
    if not len(sent_lengths):
        raise UserError(f"{name}: the corpus is empty (no document has any text)")
    sent_starts = np.concatenate([[0], np.cumsum(sent_lengths)]).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for k in range(len(plan)):
                out.write(shards.load_shard(parts, k, "tokens")["tokens"].tobytes())
        np.save(os.path.join(tmp, "sent_starts.npy"), sent_starts)
        np.save(os.path.join(tmp, "doc_starts.npy"), sent_starts[first])
        info = {
            **(meta or {}),
            "format": FORMAT,
            "dtype": np.dtype(dtype).name,
            "num_tokens": int(sent_starts[-1]),
            "num_sentences": len(sent_lengths),
            "num_docs": len(counts),
        }
        tokens.finish(path, tmp, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep_parts and parallel.get("process_count", 1) == 1:
        shutil.rmtree(parts, ignore_errors=True)
    return SentenceStore(path)


def cached(path: str, documents_fn: Callable[[], Sequence[str]], **build_kwargs) -> SentenceStore:
    if os.path.exists(os.path.join(path, "meta.json")):
        return SentenceStore(path)
    try:
        return build(path, documents_fn(), **build_kwargs)
    except (FileNotFoundError, RuntimeError):
        # Another process (a second run, a host on a shared cache) finished the same store and removed
        # the shards this one was reading: the store it wrote is this one's, bit for bit.
        if os.path.exists(os.path.join(path, "meta.json")):
            return SentenceStore(path)
        raise
