"""Greedy decoding for causal models (a fixed-size buffer: one compiled forward for every step)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy(graphdef, state, prompt_ids: list[int], max_new_tokens: int, max_len: int, eos_id: int | None = None):
    """Continue ``prompt_ids`` greedily; ``state`` is a TrainState's state (the model is read from it)."""
    prompt_ids = list(prompt_ids)[-(max_len - 1) :] or [0]
    total = min(max_len, len(prompt_ids) + max_new_tokens)
    buf = np.zeros((1, total), np.int32)
    buf[0, : len(prompt_ids)] = prompt_ids

    @functools.partial(jax.jit, donate_argnums=())
    def next_token(state, buf, t):
        model = nnx.merge(graphdef, state).model
        logits = model(buf)  # causal: positions >= t do not affect position t-1
        return jnp.argmax(logits[0, t - 1]).astype(jnp.int32)

    out = []
    for t in range(len(prompt_ids), total):
        tok = int(next_token(state, jnp.asarray(buf), t))
        buf[0, t] = tok
        out.append(tok)
        if eos_id is not None and tok == eos_id:
            break
    return out
