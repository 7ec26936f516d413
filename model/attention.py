"""Attention kernels behind one switch, and the masks they take.

Every attention in podformer goes through ``attention``; ``impl`` picks the kernel ('xla' by default).
Masks are boolean (B, 1, L, S): True where a query may attend to a key. Additive biases (T5's
relative positions, ALiBi) are (B or 1, H, L, S) float arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def make_attention_mask(
    q_segment_ids_BL: Array,
    kv_segment_ids_BS: Array,
    *,
    causal: bool,
    q_positions_BL: Array | None = None,
    kv_positions_BS: Array | None = None,
) -> Array:
    """Boolean (B, 1, L, S) mask: same segment, and for causal attention key index <= query index.

    Segment id 0 marks padding. Padding queries may only see padding keys, so no softmax row is ever
    empty (an all-masked row would give NaNs or a uniform average of garbage).
    """
    mask = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
    if causal:
        # Causality is by index in the packed row, not by position id: positions restart per segment.
        L, S = q_segment_ids_BL.shape[1], kv_segment_ids_BS.shape[1]
        mask &= (jnp.arange(L)[:, None] + (S - L)) >= jnp.arange(S)[None, :]
    return mask[:, None, :, :]


def local_window_mask(L: int, S: int, window: Array | int) -> Array:
    """(1, 1, L, S): key within the last ``window`` indices of the query (GPT-Neo's local layers), by index
    in the row like the causal mask. ``window`` may be traced (a per-layer input of a scanned stack);
    0 means unlimited (a global layer)."""
    distance = (jnp.arange(L)[:, None] + (S - L)) - jnp.arange(S)[None, :]
    return ((window <= 0) | (distance < window))[None, None]


def alibi_slopes(num_heads: int) -> Array:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence from 2^(-8/n); for a head count
    that is not a power of two, the odd entries of the next power's sequence fill the rest (BLOOM)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra**i for i in range(1, 2 * min(closest, num_heads - closest), 2)]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, kv_positions_BS: Array) -> Array:
    """(B, H, 1, S) additive ALiBi bias. It depends on the key position only: ``-slope * (q - k)`` and
    ``slope * k`` differ by a per-row constant, which softmax ignores (BLOOM's formulation)."""
    return alibi_slopes(num_heads)[None, :, None, None] * kv_positions_BS[:, None, None, :].astype(jnp.float32)


def t5_relative_buckets(relative_BLS: Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of ``key - query`` offsets: exact buckets for small offsets, logarithmic ones up
    to ``max_distance``; bidirectional attention spends half the buckets on each direction."""
    buckets = jnp.zeros_like(relative_BLS)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_BLS > 0).astype(relative_BLS.dtype) * num_buckets
        n = jnp.abs(relative_BLS)
    else:
        n = -jnp.minimum(relative_BLS, 0)
    max_exact = num_buckets // 2
    # float32 log, then truncation toward zero, exactly as the reference computes it.
    large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(relative_BLS.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(n < max_exact, n, large)


def _attention_reference(q, k, v, mask, bias, scale, dropout_rate, rng):
    """Plain einsum attention with float32 softmax; the only path that supports attention dropout."""
    B, L, H, K = q.shape
    G = k.shape[2]
    q = q.reshape(B, L, G, H // G, K)
    logits = jnp.einsum("BLGRK,BSGK->BGRLS", q, k).astype(jnp.float32) * scale
    logits = logits.reshape(B, H, L, -1)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, dropout_rate, rng).astype(v.dtype)
    out = jnp.einsum("BGRLS,BSGK->BLGRK", probs.reshape(B, G, H // G, L, -1), v)
    return out.reshape(B, L, H, K)


def _attention_jax(implementation):
    def fn(q, k, v, mask, bias, scale, dropout_rate, rng):
        if dropout_rate > 0.0 and rng is not None:
            return _attention_reference(q, k, v, mask, bias, scale, dropout_rate, rng)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)

    return fn


# One switch for the attention kernel; every call in podformer goes through `attention` below.
ATTENTION_IMPLS = {
    "xla": _attention_jax("xla"),
    "cudnn": _attention_jax("cudnn"),
    "reference": _attention_reference,
}


def attention(
    q_BLHK: Array,
    k_BSGK: Array,
    v_BSGK: Array,
    *,
    mask_B1LS: Array | None,
    bias_BHLS: Array | None = None,
    scale: float,
    impl: str = "xla",
    dropout_rate: float = 0.0,
    rng: Array | None = None,
) -> Array:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[impl](q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS, scale, dropout_rate, rng)
