"""The loss type, token cross-entropy and the causal-LM loss; podformer/losses.py has every objective's."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from podformer.model import lm_head


@dataclasses.dataclass(frozen=True)
class Loss:
    # (model, batch, rng, denominators) -> (scalar loss, {metric name: scalar}); each metric already
    # divided by its denominator, so summing over micro-batches gives the global-batch value.
    fn: Callable
    # batch -> {name: scalar}: the normalisers, computed once over the whole global batch.
    denominators: Callable
    # Evaluation: (sums, denominators) -> metrics, where ``sums`` are ``fn``'s metrics computed with every
    # denominator 1 and added over batches. None: each metric over the (single) denominator. Losses with
    # several denominators say which metric takes which, and rebuild composite metrics from their parts.
    reduce_fn: Callable | None = None

    def reduce(self, sums: dict, denominators: dict) -> dict:
        if self.reduce_fn is not None:
            return self.reduce_fn(sums, {k: max(v, 1.0) for k, v in denominators.items()})
        if len(denominators) != 1:
            raise ValueError(f"a loss with denominators {sorted(denominators)} needs a reduce_fn")
        n = max(next(iter(denominators.values())), 1.0)
        return {k: v / n for k, v in sums.items()}


def token_cross_entropy(logits_BLV, targets_BL, weights_BL):
    """Summed cross-entropy (float32) and summed correct predictions over weighted tokens. Logits over a
    padded vocabulary come with the padding at vocab.PAD_LOGIT (the models mask it where they make them):
    it adds exactly 0 to the exp-sum and never reaches the row max, so nothing here needs to know of it.

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
    kw = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], rng=rng)
    if hasattr(model, "output_projection"):
        # The output projection fused with the loss: the (B, L, V) logits are never materialised.
        x_BLD = model(batch["inputs"], return_hidden=True, **kw)
        w_VD, bias_V = model.output_projection()
        ce, correct = lm_head.cross_entropy(
            x_BLD, w_VD, batch["targets"], batch["loss_weights"], bias_V=bias_V, vocab_size=model.cfg.vocab_size
        )
    else:  # a model of its own: its logits, over whatever vocabulary it returns
        logits = model(batch["inputs"], **kw)
        ce, correct = token_cross_entropy(logits, batch["targets"], batch["loss_weights"])
    n = jnp.maximum(denom["tokens"], 1.0)
    return ce / n, {"loss": ce / n, "accuracy": correct / n}


causal_lm = Loss(_causal_lm, lambda batch: {"tokens": jnp.sum(batch["loss_weights"])})
