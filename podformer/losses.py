"""Training losses by objective. Each returns normalised contributions so that gradient accumulation
over micro-batches gives exactly the full-batch mean (denominators come from the whole global batch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Loss:
    # (model, batch, rng, denominators) -> (scalar loss, {metric name: scalar}); each metric already
    # divided by its denominator, so summing over micro-batches gives the global-batch value.
    fn: Callable
    # batch -> {name: scalar}: the normalisers, computed once over the whole global batch.
    denominators: Callable


def token_cross_entropy(logits_BLV, targets_BL, weights_BL):
    """Summed cross-entropy (float32) and summed correct predictions over weighted tokens.

    Written as logsumexp - target logit (not log_softmax + gather): the vocabulary-sized arrays are
    passed over fewer times, which is most of the loss's cost on CPUs. A prediction counts as correct
    when the target's logit is the row maximum, reusing the max the logsumexp needs (no argmax pass)."""
    logits = logits_BLV.astype(jnp.float32)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    lse = jnp.log(jnp.sum(jnp.exp(logits - row_max), axis=-1)) + row_max[..., 0]
    target = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    correct = (target >= row_max[..., 0]).astype(jnp.float32)
    return jnp.sum((lse - target) * weights_BL), jnp.sum(correct * weights_BL)


def _causal_lm(model, batch, rng, denom):
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"], rng=rng)
    ce, correct = token_cross_entropy(logits, batch["targets"], batch["loss_weights"])
    n = jnp.maximum(denom["tokens"], 1.0)
    return ce / n, {"loss": ce / n, "accuracy": correct / n}


causal_lm = Loss(_causal_lm, lambda batch: {"tokens": jnp.sum(batch["loss_weights"])})

LOSSES = {"causal_lm": causal_lm}

# Pretraining objectives beyond causal LM (MLM/NSP/SOP, seq2seq, distillation) register themselves here.
import podformer.objective_losses  # noqa: E402, F401
