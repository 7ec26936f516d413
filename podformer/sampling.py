"""Sampling filters, transformers' logits processors in JAX, and the per-row keys that draw from them.

Each filter is the float32 computation of its transformers counterpart (transformers 5,
``generation/logits_process.py``), ties and -inf entries included, so a filtered row keeps exactly the
tokens theirs keeps (top-p's ties: see top_p): ``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper`` (min_tokens_to_keep=1), applied in the
order their ``generate`` applies them. A filter at its neutral value is skipped, as they skip it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from podformer.core.errors import UserError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What ``generate.sample`` draws from. ``top_k=0`` is "off" (transformers' generate defaults to 50);
    ``repetition_penalty`` applies to the prompt's tokens and the generated ones (padding excluded)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        problems = []
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature} must be > 0 (greedy decoding is top_k=1)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k={self.top_k} must be an integer >= 0 (0: no top-k filter)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1: no nucleus filter)")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1] (0: no min-p filter)")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1: none)")
        if problems:
            raise UserError("sampling: " + "; ".join(problems))


def repetition_penalty(logits_NV: Array, seen_NV: Array, penalty: float) -> Array:
    """Seen tokens' logits: negative ones times ``penalty``, the others divided by it."""
    penalised = jnp.where(logits_NV < 0, logits_NV * penalty, logits_NV / penalty)
    return jnp.where(seen_NV, penalised, logits_NV)


def temperature(logits_NV: Array, t: float) -> Array:
    return logits_NV / t


def top_k(logits_NV: Array, k: int) -> Array:
    """Everything below the k-th largest logit -> -inf; ties with it stay (``scores < kth``)."""
    k = min(k, logits_NV.shape[-1])
    kth = jax.lax.top_k(logits_NV, k)[0][..., -1:]
    return jnp.where(logits_NV < kth, -jnp.inf, logits_NV)


def top_p(logits_NV: Array, p: float) -> Array:
    """The nucleus: sorted ascending, the tokens whose cumulative probability is <= 1 - p leave, the most
    likely one always stays. Tokens tied with the least likely one kept stay too, as TopKLogitsWarper keeps
    ties: transformers' top-p splits such a tie by the order of torch's unstable sort, which is an accident
    of the device (and of the vocabulary size), so no fixed rule could equal it."""
    sorted_NV = jnp.sort(logits_NV, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_NV, axis=-1), axis=-1)
    # Each token is judged by the cumulative mass at the end of its tie group.
    last_of_tie = jax.vmap(lambda row: jnp.searchsorted(row, row, side="right") - 1)(sorted_NV)
    drop_sorted = jnp.take_along_axis(cumulative, last_of_tie, axis=-1) <= 1 - p
    drop_sorted = drop_sorted.at[..., -1].set(False)
    # The cut as a logit: everything strictly below the least likely kept token leaves.
    cut = jnp.min(jnp.where(drop_sorted, jnp.inf, sorted_NV), axis=-1, keepdims=True)
    return jnp.where(logits_NV < cut, -jnp.inf, logits_NV)


def min_p(logits_NV: Array, p: float) -> Array:
    """Tokens less likely than ``p`` times the most likely one -> -inf (the most likely always stays)."""
    probs = jax.nn.softmax(logits_NV, axis=-1)
    drop = probs < p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(drop, -jnp.inf, logits_NV)


def filter_logits(logits_NV: Array, seen_NV: Array | None, s: Sampling) -> Array:
    """Every filter of ``s``, in transformers' order: repetition penalty, temperature, top-k, top-p, min-p."""
    x = logits_NV.astype(jnp.float32)
    if s.repetition_penalty != 1.0:
        x = repetition_penalty(x, seen_NV, s.repetition_penalty)
    if s.temperature != 1.0:
        x = temperature(x, s.temperature)
    if s.top_k:
        x = top_k(x, s.top_k)
    if s.top_p < 1.0:
        x = top_p(x, s.top_p)
    if s.min_p > 0.0:
        x = min_p(x, s.min_p)
    return x


def row_keys(key: Array, rows: int) -> Array:
    """One key per output row, ``fold_in(key, row)``: a row's draws depend on the key and its index only."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rows))


def draw(keys_N: Array, t, filtered_NV: Array) -> Array:
    """Token ``t`` of every row (int32 (N,)): a categorical draw from the filtered logits with the row's
    key folded with ``t`` (-inf entries are never drawn)."""
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys_N)
    return jax.vmap(lambda k, x: jax.random.categorical(k, x))(step_keys, filtered_NV).astype(jnp.int32)
