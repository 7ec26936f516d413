"""T5's span corruption and prefix LM objectives, in numpy, following T5's reference code.

Ported from ``t5.data.preprocessors`` (``random_spans_helper``, ``random_spans_noise_mask``,
``noise_span_to_unique_sentinel``, ``nonnoise_span_to_unique_sentinel``, ``random_prefix_noise_mask``,
``drop_noise_tokens``); TensorFlow's stateless ops are replaced by a ``numpy`` Generator, so every
example is a pure function of its tokens and its rng.
"""

from __future__ import annotations

import numpy as np


def random_spans_helper(
    inputs_length: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    extra_tokens_per_span_inputs: int = 1,
    extra_tokens_per_span_targets: int = 1,
) -> tuple[int, int]:
    """(tokens_length, targets_length): how many raw tokens to corrupt so that the inputs -- non-noise
    tokens, one sentinel per noise span and EOS -- fill ``inputs_length`` exactly."""

    def lengths(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return (
            num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs + 1,
            num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1,
        )

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # T5's hack: with density 0.5 keep the targets no longer than the (round-numbered) inputs.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a random partition of ``num_items`` items into ``num_segments`` non-empty runs."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
    length: int, noise_density: float, rng: np.random.Generator, mean_noise_span_length: float = 3.0
) -> np.ndarray:
    """Boolean mask of noise tokens: ``round(length * density)`` of them, in ``round(n / mean)`` spans,
    alternating with non-noise spans and starting with a non-noise span (so the first token is kept)."""
    orig_length = length
    length = max(length, 2)  # avoid degeneracy, as T5 does
    num_noise_tokens = int(round(length * noise_density))
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = max(int(round(num_noise_tokens / mean_noise_span_length)), 1)
    num_nonnoise_tokens = length - num_noise_tokens
    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans, rng)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros(length, np.int64)
    span_start_indicator[span_starts] = 1
    span_num = np.cumsum(span_start_indicator)
    return (span_num % 2 == 1)[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Each noise span -> one sentinel; sentinels count down from ``vocab_size - 1`` (``<extra_id_0>``)."""
    prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~prev_is_noise
    subsequent_noise = noise_mask & prev_is_noise
    sentinel = vocab_size - np.cumsum(first_noise)  # (vocab_size - 1) + 1 - cumsum
    out = np.where(first_noise, sentinel, tokens)
    return out[~subsequent_noise].astype(tokens.dtype)


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, vocab_size: int) -> np.ndarray:
    return noise_span_to_unique_sentinel(tokens, ~noise_mask, vocab_size)


def span_corruption(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    eos_id: int,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) with EOS appended, as T5's ``span_corruption`` preprocessor makes them.

    Given ``tokens_length`` raw tokens from :func:`random_spans_helper`, ``len(inputs)`` is exactly the
    ``inputs_length`` the helper was asked for and ``len(targets)`` its ``targets_length``."""
    tokens = np.asarray(tokens)
    mask = random_spans_noise_mask(len(tokens), noise_density, rng, mean_noise_span_length)
    inputs = noise_span_to_unique_sentinel(tokens, mask, vocab_size)
    targets = nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size)
    eos = np.asarray([eos_id], tokens.dtype)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def fill_spans(inputs: np.ndarray, targets: np.ndarray, vocab_size: int, num_sentinels: int = 100) -> np.ndarray:
    """The inverse of :func:`span_corruption` (EOS stripped): each sentinel in ``inputs`` replaced by the
    tokens that follow the same sentinel in ``targets``. For tests and for reading model outputs."""
    is_sentinel = lambda x: x >= vocab_size - num_sentinels  # noqa: E731
    spans, current = {}, None
    for t in targets:
        if is_sentinel(t):
            current = int(t)
            spans[current] = []
        elif current is not None:
            spans[current].append(int(t))
    out = []
    for t in inputs:
        out.extend(spans.get(int(t), []) if is_sentinel(t) else [int(t)])
    return np.asarray(out, inputs.dtype)


def prefix_lm(
    tokens: np.ndarray, rng: np.random.Generator, *, eos_id: int, noise_density: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) with EOS appended: a prefix of uniformly random length in [1, len) as inputs,
    the rest as targets (T5's ``prefix_lm`` with ``random_prefix_noise_mask``)."""
    if noise_density != 0.5:
        raise ValueError("T5's prefix LM is defined for noise density 0.5 only")
    tokens = np.asarray(tokens)
    max_input_tokens = len(tokens) - 1
    min_input_tokens = min(max_input_tokens, 1)
    n = int(rng.integers(min_input_tokens, max_input_tokens + 1))
    eos = np.asarray([eos_id], tokens.dtype)
    return np.concatenate([tokens[:n], eos]), np.concatenate([tokens[n:], eos])
