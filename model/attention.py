"""Attention kernels behind one switch, and the masks they take.

Every attention in podformer goes through ``attention``; ``impl`` picks the kernel ('xla' by default).
Masks are boolean (B, 1, L, S): True where a query may attend to a key. Additive biases (T5's
relative positions, ALiBi) are (B or 1, H, L, S) float arrays.
"""

from __future__ import annotations

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
