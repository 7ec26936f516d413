"""Pretraining losses beyond causal LM: masked LM (+ NSP/SOP), encoder-decoder LM (T5 span corruption,
prefix LM, BART) and DistilBERT's distillation. podformer/losses.py LOSSES lists them.

The math is in plain functions on arrays (tested on their own); the ``Loss`` wrappers call the model.
Model outputs: an encoder returns the MLM logits, or a dict with ``logits`` and, where the objective
needs them, ``nsp_logits`` (B, 2) and ``hidden`` (B, L, D); for distillation the model returns
``teacher_logits`` and ``teacher_hidden`` too (a student/teacher pair whose teacher is not trained).
Models are asked for ``padded_vocab`` logits: over the padded vocabulary, sharded like the tables, with
the padding at vocab.PAD_LOGIT, so it takes no probability mass in any softmax below (model/vocab.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from podformer.loss_base import Loss, token_cross_entropy


def _outputs(out) -> dict:
    return out if isinstance(out, dict) else {"logits": out}


def sequence_cross_entropy(logits_BC, labels_B):
    """Summed cross-entropy and correct count of one classification per row (NSP/SOP)."""
    logits = logits_BC.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.take_along_axis(logp, labels_B[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels_B).astype(jnp.float32)
    return jnp.sum(ce), jnp.sum(correct)


def soft_cross_entropy(student_BLV, teacher_BLV, weights_BL, temperature: float):
    """DistilBERT's soft-target loss: KL(teacher_T || student_T) * T^2, summed over weighted tokens.
    At padded columns (vocab.PAD_LOGIT in both) the teacher's probability is 0 and the log-ratio finite,
    so they add 0 and pass no gradient.

    (The KL differs from the cross-entropy with soft targets by the teacher's entropy, a constant for
    the student; the reference -- Hugging Face's distiller -- uses KLDiv with batchmean and T^2.)"""
    t = temperature
    log_p_s = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / t, axis=-1)
    log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BLV).astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return jnp.sum(kl * weights_BL) * t**2


def cosine_embedding(student_BLD, teacher_BLD, weights_BL):
    """Summed (1 - cos) between student and teacher hidden states over weighted tokens."""
    s = student_BLD.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_BLD).astype(jnp.float32)
    cos = jnp.sum(s * t, -1) / (jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1) + 1e-8)
    return jnp.sum((1.0 - cos) * weights_BL)


def _encoder_call(model, batch, rng):
    # NSP/SOP batches carry their labels; only then is the next-sentence head asked for (and must exist).
    nsp = {"with_nsp": True} if "next_sentence_labels" in batch else {}
    return _outputs(
        model(
            batch["inputs"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
            token_type_ids=batch.get("token_types"),
            rng=rng,
            padded_vocab=True,
            **nsp,
        )
    )


def _encoder_outputs(model, batch, rng, prefix: str = "") -> dict:
    """MLM logits and last hidden states of a BERT-family encoder (model/bert.py)."""
    hidden = model.encode(
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        token_type_ids=batch.get("token_types"),
        rng=rng,
    )
    out = {f"{prefix}logits": model.mlm_logits(hidden, padded_vocab=True), f"{prefix}hidden": hidden}
    return jax.lax.stop_gradient(out) if prefix else out


def _mlm(model, batch, rng, denom):
    out = _encoder_call(model, batch, rng)
    ce, correct = token_cross_entropy(out["logits"], batch["targets"], batch["loss_weights"])
    n = jnp.maximum(denom["tokens"], 1.0)
    metrics = {"loss": ce / n, "mlm_loss": ce / n, "accuracy": correct / n}
    if "next_sentence_labels" in batch:
        nce, ncorrect = sequence_cross_entropy(out["nsp_logits"], batch["next_sentence_labels"])
        rows = jnp.maximum(denom["rows"], 1.0)
        metrics.update(loss=ce / n + nce / rows, nsp_loss=nce / rows, nsp_accuracy=ncorrect / rows)
    return metrics["loss"], metrics


def _mlm_reduce(sums, denom):
    out = {"mlm_loss": sums["mlm_loss"] / denom["tokens"], "accuracy": sums["accuracy"] / denom["tokens"]}
    out["loss"] = out["mlm_loss"]
    if "nsp_loss" in sums:
        out.update(nsp_loss=sums["nsp_loss"] / denom["rows"], nsp_accuracy=sums["nsp_accuracy"] / denom["rows"])
        out["loss"] = out["mlm_loss"] + out["nsp_loss"]
    return out


def _mlm_denominators(batch):
    d = {"tokens": jnp.sum(batch["loss_weights"])}
    if "next_sentence_labels" in batch:
        d["rows"] = jnp.asarray(batch["next_sentence_labels"].shape[0], jnp.float32)
    return d


mlm = Loss(_mlm, _mlm_denominators, _mlm_reduce)


def _seq2seq(model, batch, rng, denom):
    logits = _outputs(
        model(
            batch["encoder_inputs"],
            batch["decoder_inputs"],
            encoder_segment_ids=batch["encoder_segment_ids"],
            encoder_positions=batch["encoder_positions"],
            decoder_segment_ids=batch["decoder_segment_ids"],
            decoder_positions=batch["decoder_positions"],
            rng=rng,
            padded_vocab=True,
        )
    )["logits"]
    ce, correct = token_cross_entropy(logits, batch["decoder_targets"], batch["decoder_loss_weights"])
    n = jnp.maximum(denom["tokens"], 1.0)
    return ce / n, {"loss": ce / n, "accuracy": correct / n}


seq2seq = Loss(_seq2seq, lambda batch: {"tokens": jnp.sum(batch["decoder_loss_weights"])})


def distillation_terms(out: dict, batch: dict, *, temperature: float):
    """Summed (soft CE, MLM CE, cosine, correct) for a DistilBERT batch. Soft targets and the cosine
    run over every real token (Hugging Face's distiller defaults), the MLM loss over masked ones."""
    real = (batch["segment_ids"] > 0).astype(jnp.float32)
    soft = soft_cross_entropy(out["logits"], out["teacher_logits"], real, temperature)
    ce, correct = token_cross_entropy(out["logits"], batch["targets"], batch["loss_weights"])
    cos = cosine_embedding(out["hidden"], out["teacher_hidden"], real) if "hidden" in out else jnp.float32(0)
    return soft, ce, cos, correct


def make_distillation(temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0, alpha_cos: float = 1.0):
    """DistilBERT's loss, ``alpha_ce * soft + alpha_mlm * mlm + alpha_cos * cosine`` (the paper's
    released weights 5/2/1 at temperature 2), each term a per-token mean over the global batch."""

    def fn(model, batch, rng, denom, teacher=None):
        if teacher is None:  # a model that returns its teacher's outputs itself
            out = _encoder_call(model, batch, rng)
        else:  # a student and its frozen teacher (podformer/trainer.py TrainState.teacher)
            out = {**_encoder_outputs(model, batch, rng), **_encoder_outputs(teacher, batch, None, "teacher_")}
        soft, ce, cos, correct = distillation_terms(out, batch, temperature=temperature)
        n_real, n_masked = jnp.maximum(denom["real"], 1.0), jnp.maximum(denom["tokens"], 1.0)
        loss = alpha_ce * soft / n_real + alpha_mlm * ce / n_masked + alpha_cos * cos / n_real
        return loss, {
            "loss": loss,
            "soft_loss": soft / n_real,
            "mlm_loss": ce / n_masked,
            "cosine_loss": cos / n_real,
            "accuracy": correct / n_masked,
        }

    def denominators(batch):
        return {
            "tokens": jnp.sum(batch["loss_weights"]),
            "real": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32)),
        }

    def reduce(sums, denom):
        out = {
            "soft_loss": sums["soft_loss"] / denom["real"],
            "mlm_loss": sums["mlm_loss"] / denom["tokens"],
            "cosine_loss": sums["cosine_loss"] / denom["real"],
            "accuracy": sums["accuracy"] / denom["tokens"],
        }
        out["loss"] = alpha_ce * out["soft_loss"] + alpha_mlm * out["mlm_loss"] + alpha_cos * out["cosine_loss"]
        return out

    return Loss(fn, denominators, reduce)


LOSSES = {
    "mlm": mlm,
    "roberta": mlm,
    "mlm_nsp": mlm,
    "mlm_sop": mlm,
    "span_corruption": seq2seq,
    "prefix_lm": seq2seq,
    "bart": seq2seq,
    "distill": make_distillation(),
}
