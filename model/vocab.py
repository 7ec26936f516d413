"""Vocabulary padding: token tables padded to a multiple of 128 for compute, the padding zero and masked.

A vocabulary of 50,257 (GPT-2) divides by no mesh axis, so its tables would be replicated on every device;
padded to 50,304 they shard over tensor=2..128 (Megatron's ``make-vocab-size-divisible-by``, MaxText). A
family config keeps ``vocab_size`` as the tokenizer's size and derives ``padded_vocab_size`` from
``vocab_multiple``. Inside a model the embedding, the output projection and its bias have the padded size;
the padded rows start at zero, and every logit of a padded column is ``PAD_LOGIT`` before any softmax, so
the padding never gets probability mass and its gradient is exactly zero: the rows stay zero under any
optimizer whose update of a zero gradient is zero (AdamW with decoupled decay of a zero weight included).

Outside a model, nothing is padded: ``__call__`` returns logits over the tokenizer's vocabulary, and the
canonical parameters (model/params.py, what Hugging Face conversion and init checkpoints read and write)
hold the real rows only, so padding is a layout, like stacked layers, and never part of an exported model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The logit of a padded column. Finite on purpose: with -inf, a KL term exp(log p_t) * (log p_t - log p_s)
# is 0 * (-inf + inf) = nan at the padding; here it is 0 * finite = 0. Far enough below any real logit
# that exp(PAD_LOGIT - row max) is exactly 0 in float32.
PAD_LOGIT = -1.0e9


def init(base, vocab_size: int, axis: int = 0):
    """The initializer ``base`` with every index of ``axis`` from ``vocab_size`` on set to zero. Without
    padding it is ``base`` itself, so unpadded tables keep their initial values bit for bit."""

    def f(key, shape, dtype=jnp.float32):
        x = base(key, shape, dtype)
        if shape[axis] == vocab_size:
            return x
        keep = jnp.arange(shape[axis]) < vocab_size
        return jnp.where(keep.reshape([-1 if i == axis else 1 for i in range(len(shape))]), x, 0).astype(dtype)

    return f


def mask(logits_V: jax.Array, vocab_size: int) -> jax.Array:
    """Logits (..., padded V) with every padded column at PAD_LOGIT. ``where`` passes no gradient to the
    replaced entries, so the padding's rows of the projection get none either."""
    V = logits_V.shape[-1]
    if V == vocab_size:
        return logits_V
    return jnp.where(jnp.arange(V) < vocab_size, logits_V, jnp.asarray(PAD_LOGIT, logits_V.dtype))
