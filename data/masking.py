"""BERT's masked LM and sentence-pair objectives (NSP, ALBERT's SOP), in numpy.

Follows BERT's ``create_pretraining_data.py`` (``create_masked_lm_predictions``,
``create_instances_from_document``, ``truncate_seq_pair``) and ALBERT's for sentence order: every
function is pure given its rng, so the loader can derive the rng from the global row index (new masks
every epoch, RoBERTa's dynamic masking) or from the row's own index (BERT's static masks).
"""

from __future__ import annotations

import numpy as np

IGNORE = 0  # target id at unselected positions; their loss weight is 0


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    special: np.ndarray,
    word_start: np.ndarray | None = None,
    mlm_probability: float = 0.15,
    max_predictions: int = 0,
    random_token_range: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights): BERT's masked LM on one sequence.

    ``round(len * mlm_probability)`` positions (at least 1, at most ``max_predictions`` when it is > 0)
    are selected among those that are not ``special``; each becomes [MASK] with probability 0.8, a
    random token with 0.1 and stays with 0.1. With ``word_start`` (whole-word masking), the candidates
    are whole words -- a start token and its continuations -- and a word that would overshoot the budget
    is skipped, as in BERT. ``targets`` holds the original token where ``weights`` is 1.
    """
    tokens = np.asarray(tokens)
    n = len(tokens)
    num_to_predict = max(1, int(round(n * mlm_probability)))
    if max_predictions > 0:
        num_to_predict = min(num_to_predict, max_predictions)
    candidates = np.flatnonzero(~special)
    selected = np.zeros(n, bool)
    if word_start is None:
        chosen = rng.permutation(candidates)[:num_to_predict]
        selected[chosen] = True
    else:
        # A word = a candidate that starts one, plus the candidates that continue it.
        starts = ~special & (word_start | np.concatenate([[True], special[:-1]]))
        word_id = np.cumsum(starts) - 1
        words = np.split(candidates, np.flatnonzero(np.diff(word_id[candidates])) + 1)
        count = 0
        for w in rng.permutation(len(words)):
            if count >= num_to_predict:
                break
            if count + len(words[w]) > num_to_predict:
                continue
            selected[words[w]] = True
            count += len(words[w])
    # One draw per selected token: < 0.8 -> [MASK], [0.8, 0.9) -> unchanged, >= 0.9 -> random token.
    u = rng.random(n)
    low, high = random_token_range or (0, vocab_size)
    random_tokens = rng.integers(low, high, n)
    inputs = np.where(selected & (u < 0.8), mask_id, tokens)
    inputs = np.where(selected & (u >= 0.9), random_tokens, inputs).astype(tokens.dtype)
    targets = np.where(selected, tokens, IGNORE).astype(tokens.dtype)
    return inputs, targets, selected.astype(np.float32)


def truncate_seq_pair(a: list, b: list, max_num_tokens: int, rng: np.random.Generator) -> None:
    """Trim the longer of the two lists, at its front or back at random, until they fit (in place)."""
    while len(a) + len(b) > max_num_tokens:
        trunc = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def sentence_pair(
    sentences: list[np.ndarray],
    rng: np.random.Generator,
    *,
    max_num_tokens: int,
    random_sentences,
    order: bool = False,
    short_seq_prob: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens_a, tokens_b, label) from one chunk of consecutive sentences of a document.

    NSP (``order=False``): A is the chunk's first ``a_end`` sentences; B is the rest (label 0) or, with
    probability 0.5 -- always when the chunk has one sentence -- sentences from another document,
    ``random_sentences(rng, target_length)`` (label 1). SOP (``order=True``, ALBERT): B is the rest and
    with probability 0.5 A and B swap (label 1). ``short_seq_prob`` of pairs get a random shorter target
    length, as BERT does to reduce the pretrain/fine-tune mismatch.
    """
    target = max_num_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_num_tokens + 1))
    a_end = int(rng.integers(1, len(sentences))) if len(sentences) >= 2 else 1
    a = [int(t) for s in sentences[:a_end] for t in s]
    rest = [int(t) for s in sentences[a_end:] for t in s]
    if order:
        label = 0
        b = rest
        if not b:  # a single sentence: ALBERT (like BERT) takes B from another document
            b, label = [int(t) for t in random_sentences(rng, max(1, target - len(a)))], 1
        elif rng.random() < 0.5:
            a, b, label = b, a, 1
    elif len(sentences) == 1 or rng.random() < 0.5:
        b, label = [int(t) for t in random_sentences(rng, max(1, target - len(a)))], 1
    else:
        b, label = rest, 0
    truncate_seq_pair(a, b, target, rng)
    return np.asarray(a, np.int32), np.asarray(b, np.int32), label


def pair_row(a: np.ndarray, b: np.ndarray, *, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """([CLS] A [SEP] B [SEP], token types 0 for [CLS] A [SEP] and 1 for B [SEP])."""
    tokens = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]]).astype(np.int32)
    types = np.concatenate([np.zeros(len(a) + 2, np.int32), np.ones(len(b) + 1, np.int32)])
    return tokens, types
