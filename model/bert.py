"""Bidirectional encoders: BERT, RoBERTa and DistilBERT, composed from model/layers.py.

One module, three settings: post-LayerNorm blocks with exact GELU, learned positions (RoBERTa's offset
past its padding row), optional token types, an optional pooler + next-sentence head, and the MLM head
(dense + GELU + LayerNorm, then the tied word embedding plus a bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import layers, vocab
from podformer.model.bert_config import BertConfig, DistilBertConfig, RobertaConfig  # noqa: F401 (re-exported)
from podformer.model.layers import Array


def block_options(cfg: BertConfig) -> layers.BlockOptions:
    """Post-LayerNorm bidirectional blocks."""
    return layers.block_options(cfg, norm="layernorm", norm_position="post", causal=False)


class Bert(nnx.Module):
    """Embeddings (+ types, + positions) -> LayerNorm -> N post-norm bidirectional blocks -> MLM head."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V, std = cfg.d_model, cfg.padded_vocab_size, cfg.init_std
        self.embed = layers.param(rngs, vocab.init(layers.normal(std), cfg.vocab_size), (V, D), ("vocab", "embed"))
        self.pos_embed = layers.param(rngs, layers.normal(std), (cfg.max_len + cfg.pos_offset, D), (None, "embed"))
        self.token_type_embed = (
            layers.param(rngs, layers.normal(std), (cfg.type_vocab_size, D), (None, "embed"))
            if cfg.type_vocab_size
            else None
        )
        norm = dict(kind="layernorm", eps=cfg.norm_eps, rngs=rngs)
        self.embed_norm = layers.Norm(D, **norm)
        o = block_options(cfg)
        self.blocks = layers.stack(o, cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
        dense = dict(use_bias=True, init_std=std, rngs=rngs)
        self.mlm_dense = layers.Dense((D,), (D,), ("embed",), (None,), **dense)
        self.mlm_norm = layers.Norm(D, **norm)
        self.mlm_bias = layers.Bias(V, ("vocab",), rngs=rngs)
        self.pooler = layers.Dense((D,), (D,), ("embed",), (None,), **dense) if cfg.pooler else None
        self.nsp = layers.Dense((D,), (2,), ("embed",), (None,), **dense) if cfg.nsp_head else None

    def _positions(self, input_ids: Array) -> Array:
        B, L = input_ids.shape
        cfg = self.cfg
        if cfg.positions_from_pad:
            tokens = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            return jnp.maximum(jnp.cumsum(tokens, axis=1) - 1, 0)
        return jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        inputs_embeds: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        """The last hidden states (B, L, D), in the compute dtype."""
        cfg = self.cfg
        dtype = layers.DTYPES[cfg.dtype]
        B, L = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if positions is None:
            positions = self._positions(input_ids)
        rng_embed, rng_blocks = jax.random.split(rng) if rng is not None else (None, None)

        x_BLD = layers.lookup(self.embed, input_ids) if inputs_embeds is None else inputs_embeds
        x_BLD = x_BLD + layers.lookup(self.pos_embed, positions, cfg.pos_offset)
        if self.token_type_embed is not None:  # DistilBERT has none: its inputs' token types are ignored
            types = jnp.zeros((B, L), jnp.int32) if token_type_ids is None else token_type_ids
            x_BLD = x_BLD + layers.lookup(self.token_type_embed, types)
        x_BLD = layers.dropout(self.embed_norm(x_BLD).astype(dtype), cfg.dropout, rng_embed)
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "activation_embed"))
        mask = layers.make_attention_mask(segment_ids, segment_ids, causal=False)
        return self.blocks(x_BLD, mask_B1LS=mask, rng=rng_blocks)

    def mlm_logits(self, hidden_BLD: Array, padded_vocab: bool = False) -> Array:
        """MLM logits (B, L, V) in float32 over the tokenizer's vocabulary (``padded_vocab``: over the
        padded one, the padding at vocab.PAD_LOGIT: the losses' view, which stays sharded over tensor)."""
        dtype = hidden_BLD.dtype
        h = self.mlm_norm(layers.ACTIVATIONS[self.cfg.activation](self.mlm_dense(hidden_BLD)))
        logits_BLV = self.mlm_bias(layers.unembed(h, self.embed[...].astype(dtype)))
        logits_BLV = sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
        V = self.cfg.vocab_size
        return vocab.mask(logits_BLV, V) if padded_vocab else logits_BLV[..., :V]

    def pooled(self, hidden_BLD: Array) -> Array:
        """tanh(dense(first token)): the sentence vector BERT's NSP head and classifiers read."""
        if self.pooler is None:
            raise ValueError("this model has no pooler (pooler=False)")
        return jnp.tanh(self.pooler(hidden_BLD[:, 0]))

    def nsp_logits(self, hidden_BLD: Array) -> Array:
        if self.nsp is None:
            raise ValueError("this model has no next-sentence head (nsp_head=False)")
        return self.nsp(self.pooled(hidden_BLD)).astype(jnp.float32)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        inputs_embeds: Array | None = None,
        rng: Array | None = None,
        padded_vocab: bool = False,
        with_nsp: bool = False,
    ) -> Array | dict:
        """MLM logits (B, L, V) in float32 (``mlm_logits``); ``with_nsp``: a dict of them (``logits``) and
        the next-sentence logits (``nsp_logits``, B x 2), as BERT's pretraining reads them. The other
        arguments are those of ``encode``."""
        hidden = self.encode(
            input_ids,
            attention_mask,
            token_type_ids,
            segment_ids=segment_ids,
            positions=positions,
            inputs_embeds=inputs_embeds,
            rng=rng,
        )
        logits = self.mlm_logits(hidden, padded_vocab)
        return {"logits": logits, "nsp_logits": self.nsp_logits(hidden)} if with_nsp else logits
