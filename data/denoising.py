"""BART's denoising: sentence permutation and text infilling, in numpy.

A port of fairseq's ``DenoisingDataset`` (``permute_sentences``, ``add_whole_word_mask`` with
``mask_length='span-poisson'`` and ``replace_length=1``, ``add_insertion_noise``) as used for BART:
mask 30% of the words in spans whose lengths are drawn from Poisson(3), each span replaced by a single
mask token (a zero-length span inserts one), 10% of the mask tokens replaced by random tokens.
"""

from __future__ import annotations

import math

import numpy as np


def permute_sentences(tokens: np.ndarray, sentence_starts: np.ndarray, rng: np.random.Generator, p: float = 1.0):
    """The sentences of ``tokens`` (starting at the sorted offsets ``sentence_starts``, the first one 0)
    with ``ceil(n * p)`` of them shuffled among their own places; ``p=1`` shuffles them all."""
    tokens = np.asarray(tokens)
    bounds = np.concatenate([np.asarray(sentence_starts, np.int64), [len(tokens)]])
    n = len(bounds) - 1
    num_to_permute = math.ceil((n * 2 * p) / 2.0)
    substitutions = rng.permutation(n)[:num_to_permute]
    ordering = np.arange(n)
    ordering[substitutions] = substitutions[rng.permutation(num_to_permute)]
    return np.concatenate([tokens[bounds[i] : bounds[i + 1]] for i in ordering] or [tokens[:0]])


def poisson_span_lengths(num_to_mask: int, rng: np.random.Generator, poisson_lambda: float = 3.0) -> np.ndarray:
    """Span lengths (zeros included) from Poisson(lambda) whose sum is exactly ``num_to_mask``: draws
    until the budget is reached, then trims the last span to fit (fairseq)."""
    lengths = rng.poisson(poisson_lambda, num_to_mask)
    while lengths.sum() < num_to_mask:
        lengths = np.concatenate([lengths, rng.poisson(poisson_lambda, num_to_mask)])
    cum = np.cumsum(lengths)
    i = int(np.searchsorted(cum, num_to_mask))  # first span reaching the budget
    lengths[i] = num_to_mask - (cum[i - 1] if i else 0)
    return lengths[: i + 1]


def add_insertion_noise(tokens, p: float, rng, *, mask_id: int, vocab_size: int, random_ratio: float):
    """Insert ``ceil(len * p)`` mask tokens at random places, never before the first or after the last."""
    if p == 0.0:
        return tokens
    num_tokens = len(tokens)
    n = int(math.ceil(num_tokens * p))
    noise_indices = rng.permutation(num_tokens + n - 2)[:n] + 1
    noise_mask = np.zeros(num_tokens + n, bool)
    noise_mask[noise_indices] = True
    result = np.full(num_tokens + n, -1, np.int64)
    num_random = int(math.ceil(n * random_ratio))
    result[noise_indices[num_random:]] = mask_id
    result[noise_indices[:num_random]] = rng.integers(1, vocab_size, num_random)
    result[~noise_mask] = tokens
    return result.astype(tokens.dtype)


def text_infilling(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    word_start: np.ndarray | None = None,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    random_ratio: float = 0.1,
) -> np.ndarray:
    """``tokens`` (``<s> ... </s>``; the first and last are never masked) with ``ceil(words * mask_ratio)``
    words masked in Poisson-length spans, each span -> one ``mask_id``; zero-length spans insert one.
    ``word_start`` marks the tokens that start a word (default: every token)."""
    source = np.array(tokens, copy=True)
    is_word_start = np.ones(len(source), np.int64) if word_start is None else np.asarray(word_start, np.int64).copy()
    is_word_start[0] = is_word_start[-1] = 0
    num_to_mask = int(math.ceil(is_word_start.sum() * mask_ratio))
    if num_to_mask == 0:
        return source
    lengths = poisson_span_lengths(num_to_mask, rng, poisson_lambda)
    num_to_mask = len(lengths)
    lengths = lengths[lengths > 0]
    num_inserts = num_to_mask - len(lengths)
    num_to_mask -= num_inserts
    noise = dict(mask_id=mask_id, vocab_size=vocab_size, random_ratio=random_ratio)
    if num_to_mask == 0:
        return add_insertion_noise(source, num_inserts / len(source), rng, **noise)
    word_starts = np.flatnonzero(is_word_start)
    indices = word_starts[rng.permutation(len(word_starts))[:num_to_mask]]
    lengths = lengths[: len(indices)]  # fewer words than spans: fairseq would fail; mask what exists
    mask_random = rng.random(len(indices)) < random_ratio
    to_keep = np.ones(len(source), bool)
    is_word_start[-1] = 255  # a long "word" at the end: no span runs past the last token
    source[indices] = mask_id
    source[indices[mask_random]] = rng.integers(1, vocab_size, int(mask_random.sum()))
    # Each span keeps its first token (now the mask) and deletes the rest of its words.
    lengths = lengths - 1
    while len(indices):
        lengths = lengths - is_word_start[indices + 1]
        uncompleted = lengths >= 0
        indices = indices[uncompleted] + 1
        lengths = lengths[uncompleted]
        to_keep[indices] = False
    source = source[to_keep]
    if num_inserts > 0:
        source = add_insertion_noise(source, num_inserts / len(source), rng, **noise)
    return source


def bart_example(
    tokens: np.ndarray,
    sentence_starts: np.ndarray,
    rng: np.random.Generator,
    *,
    bos_id: int,
    eos_id: int,
    mask_id: int,
    vocab_size: int,
    permute: bool = True,
    infill: bool = True,
    **infill_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) for one text: target is ``<s> text </s>``; source is the same with its
    sentences permuted, then text infilling (fairseq's order)."""
    tokens = np.asarray(tokens, np.int32)
    target = np.concatenate([[bos_id], tokens, [eos_id]]).astype(np.int32)
    body = permute_sentences(tokens, sentence_starts, rng) if permute and len(sentence_starts) > 1 else tokens
    source = np.concatenate([[bos_id], body, [eos_id]]).astype(np.int32)
    if infill:
        source = text_infilling(source, rng, mask_id=mask_id, vocab_size=vocab_size, **infill_kwargs)
    return source, target
