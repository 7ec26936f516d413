"""Task heads for fine-tuning, on top of any family's backbone.

``FineTuneModel`` holds the pretrained backbone (``.backbone``, parameter names unchanged, so a checkpoint
loads into it as into the bare model) and a freshly initialised head (``.head``). Where the sequence
vector comes from depends on the family, as in transformers' ``*ForSequenceClassification`` classes:
encoders read the first token ([CLS] / <s>; through BERT's pooler when the model has one), decoders the
last real token (the only one that has seen the whole text), encoder-decoders the decoder's last real
token with the shifted input as decoder input (BART's recipe). Span (extractive QA) and token heads read
every position. Text-to-text and SFT have no head: the backbone's own LM head is trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.model import families, layers
from podformer.model.layers import Array

# task type -> what the head outputs per example
HEADS = ("sequence", "span", "token", "lm")


class SequenceHead(nnx.Module):
    """[dense + tanh] -> dropout -> dense to ``num_outputs`` (classes, or 1 for regression). The hidden
    dense is skipped where the backbone already has one (BERT's pooler) and for decoders (GPT-2's
    ``score`` is a single projection)."""

    def __init__(self, d_model: int, num_outputs: int, *, hidden: bool, dropout: float, init_std: float, rngs):
        dense = dict(use_bias=True, init_std=init_std, rngs=rngs)
        self.dense = layers.Dense((d_model,), (d_model,), ("embed",), (None,), **dense) if hidden else None
        self.out = layers.Dense((d_model,), (num_outputs,), ("embed",), (None,), **dense)
        self.dropout = dropout

    def __call__(self, x_BD: Array, rng: Array | None) -> Array:
        r1, r2 = jax.random.split(rng) if rng is not None else (None, None)
        if self.dense is not None:
            x_BD = jnp.tanh(self.dense(layers.dropout(x_BD, self.dropout, r1)))
        return self.out(layers.dropout(x_BD, self.dropout, r2)).astype(jnp.float32)


class PositionHead(nnx.Module):
    """dropout -> dense to ``num_outputs`` at every position: 2 for QA spans (start, end), the tag set for
    token classification."""

    def __init__(self, d_model: int, num_outputs: int, *, dropout: float, init_std: float, rngs):
        self.out = layers.Dense(
            (d_model,), (num_outputs,), ("embed",), (None,), use_bias=True, init_std=init_std, rngs=rngs
        )
        self.dropout = dropout

    def __call__(self, x_BLD: Array, rng: Array | None) -> Array:
        return self.out(layers.dropout(x_BLD, self.dropout, rng)).astype(jnp.float32)


def last_index(segment_ids_BL: Array) -> Array:
    """Index of each row's last real token (rows are right-padded; segment 0 is padding)."""
    return jnp.maximum(jnp.sum((segment_ids_BL > 0).astype(jnp.int32), axis=1) - 1, 0)


class FineTuneModel(nnx.Module):
    """A backbone plus a task head. ``__call__(batch, rng)`` returns the head's float32 outputs:
    sequence (B, C), span (B, L, 2), token (B, L, C); for 'lm' heads the backbone is used directly."""

    def __init__(self, backbone: nnx.Module, family: str, head: str, num_outputs: int, *, dropout: float, rngs):
        row = families.get(family)
        if head not in row.heads:
            raise ValueError(f"head {head!r}: a {family} model takes one of {', '.join(row.heads)}")
        self.backbone = backbone
        self.kind, self.head_kind = row.kind, head
        cfg = backbone.cfg
        std = cfg.init_std
        if head == "sequence":
            has_pooler = getattr(backbone, "pooler", None) is not None
            hidden = self.kind != "decoder" and not has_pooler
            self.head = SequenceHead(cfg.d_model, num_outputs, hidden=hidden, dropout=dropout, init_std=std, rngs=rngs)
        elif head in ("span", "token"):
            self.head = PositionHead(cfg.d_model, num_outputs, dropout=dropout, init_std=std, rngs=rngs)
        else:
            self.head = None

    def hidden(self, batch: dict, rng: Array | None) -> Array:
        """The backbone's last hidden states (B, L, D): the encoder's, the decoder's after its final norm,
        or an encoder-decoder's decoder states."""
        bb = self.backbone
        if self.kind == "encoder":
            return bb.encode(
                batch["inputs"],
                token_type_ids=batch.get("token_types"),
                segment_ids=batch["segment_ids"],
                positions=batch["positions"],
                rng=rng,
            )
        if self.kind == "decoder":
            return bb(
                batch["inputs"],
                segment_ids=batch["segment_ids"],
                positions=batch["positions"],
                rng=rng,
                return_hidden=True,
            )
        r_enc, r_dec = jax.random.split(rng) if rng is not None else (None, None)
        enc_seg = batch["encoder_segment_ids"]
        encoded = bb.encode(
            batch["encoder_inputs"], segment_ids=enc_seg, positions=batch["encoder_positions"], rng=r_enc
        )
        return bb.decoder(
            batch["decoder_inputs"],
            bb.embed[...],
            batch["decoder_segment_ids"],
            batch["decoder_positions"],
            encoded_BSD=encoded,
            encoder_segment_ids_BS=enc_seg,
            rng=r_dec,
        )

    def __call__(self, batch: dict, rng: Array | None = None) -> Array:
        if self.head is None:
            raise ValueError("an 'lm' fine-tuning model is called through its backbone")
        r_body, r_head = jax.random.split(rng) if rng is not None else (None, None)
        x_BLD = self.hidden(batch, r_body)
        if self.head_kind != "sequence":
            return self.head(x_BLD, r_head)
        if self.kind == "encoder":
            x_BD = self.backbone.pooled(x_BLD) if getattr(self.backbone, "pooler", None) is not None else x_BLD[:, 0]
        else:
            seg = batch["segment_ids"] if self.kind == "decoder" else batch["decoder_segment_ids"]
            x_BD = jnp.take_along_axis(x_BLD, last_index(seg)[:, None, None], axis=1)[:, 0]
        return self.head(x_BD, r_head)
