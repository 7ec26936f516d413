"""Row plans: where each row of an objective starts and ends in a sentence store, computed once.

A plan depends only on the store's static lengths (sentence and document boundaries), never on the
randomness of an objective, so row i is always the same tokens and any row can be read directly. The
random part (masks, spans, pair choices) is applied afterwards, per row, from an rng derived from the
row's global index (data/rows.py). Plans are cached next to the store.
"""

from __future__ import annotations

import os

import numpy as np

from podformer.data.store import SentenceStore


def cached(store: SentenceStore, name: str, compute) -> np.ndarray:
    path = os.path.join(store.path, f"plan-{name}.npy")
    if os.path.exists(path):
        return np.load(path)
    plan = compute()
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, plan)
    os.replace(tmp, path)
    return plan


def token_rows(store: SentenceStore, budget: int, *, cross_documents: bool) -> np.ndarray:
    """Boundaries (n+1,) of consecutive token ranges that end at sentence boundaries and hold at most
    ``budget`` tokens -- counting one separator per document boundary crossed when ``cross_documents``
    (RoBERTa's FULL-SENTENCES), never crossing one otherwise. A sentence longer than the budget is cut.
    The ranges partition the store: every token is in exactly one row."""
    bounds, docs, n = store.sent_starts, store.doc_starts, store.num_tokens
    out, s = [0], 0
    while s < n:
        limit = n if cross_documents else int(docs[np.searchsorted(docs, s, side="right")])
        target = s + budget
        while True:
            e = int(bounds[np.searchsorted(bounds, min(target, limit), side="right") - 1])
            if e <= s:  # the sentence at s is longer than the budget: cut it
                e = min(s + budget, limit)
            crossed = int(np.searchsorted(docs, e, side="left") - np.searchsorted(docs, s, side="right"))
            if not cross_documents or (e - s) + crossed <= budget or e - s <= 1:
                break
            target = s + budget - crossed
        out.append(e)
        s = e
    return np.asarray(out, np.int64)


def sentence_chunks(store: SentenceStore, target: int) -> np.ndarray:
    """(n, 2) sentence ranges [a, b) within documents, each the shortest run of sentences reaching
    ``target`` tokens or ending its document -- BERT's ``create_instances_from_document`` chunking."""
    starts = store.sent_starts
    doc_end = store.doc_first_sentence[1:]
    out = []
    for d in range(store.num_docs):
        a, end = int(store.doc_first_sentence[d]), int(doc_end[d])
        while a < end:
            b = int(np.searchsorted(starts, starts[a] + target, side="left"))
            b = min(max(b, a + 1), end)
            out.append((a, b))
            a = b
    return np.asarray(out, np.int64).reshape(-1, 2)


def fixed_chunks(store: SentenceStore, size: int) -> np.ndarray:
    """(n, 2) token ranges: each document cut into pieces of ``size`` tokens, the last shorter (T5's
    ``split_tokens``)."""
    d0, d1 = store.doc_starts[:-1], store.doc_starts[1:]
    counts = -(-(d1 - d0) // size)
    first = np.repeat(d0, counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    starts = first + k * size
    ends = np.minimum(starts + size, np.repeat(d1, counts))
    return np.stack([starts, ends], axis=1).astype(np.int64)


def greedy_groups(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Boundaries (m+1,) of consecutive groups whose ``sizes`` sum to at most ``capacity`` (each size
    must fit on its own): the packing plan for variable-length examples."""
    cum = np.concatenate([[0], np.cumsum(sizes)])
    out, a = [0], 0
    while a < len(sizes):
        b = int(np.searchsorted(cum, cum[a] + capacity, side="right")) - 1
        a = max(b, a + 1)
        out.append(a)
    return np.asarray(out, np.int64)
