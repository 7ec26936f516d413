"""Bidirectional encoders: BERT, RoBERTa and DistilBERT, composed from model/layers.py.

One module, three settings: post-LayerNorm blocks with exact GELU, learned positions (RoBERTa's offset
past its padding row), optional token types, an optional pooler + next-sentence head, and the MLM head
(dense + GELU + LayerNorm, then the tied word embedding plus a bias).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import layers, vocab
from podformer.model.layers import Array


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # the tokenizer's
    # The token tables have padded_vocab_size rows (a multiple of this; 1: none), so they shard over tensor;
    # the padding is masked out of every softmax and never leaves the model (model/vocab.py).
    vocab_multiple: int = 128
    max_len: int = 512  # longest sequence; the position table has max_len + pos_offset rows
    type_vocab_size: int = 2  # token types (segments A/B); 0: none (DistilBERT)
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    # RoBERTa: positions count non-pad tokens from pad_token_id + 1, so row p + 2 holds position p and the
    # positions of a padded row come from its input ids (exactly as fairseq and transformers do).
    pos_offset: int = 0
    positions_from_pad: bool = False
    pooler: bool = True  # tanh dense layer on the first token ([CLS])
    nsp_head: bool = True  # next-sentence prediction on the pooled output (BERT pretraining)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.d_model % self.num_heads and not self.head_dim:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.nsp_head and not self.pooler:
            raise ValueError("nsp_head needs the pooler (it classifies the pooled [CLS] vector)")

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the token tables: vocab_size rounded up to a multiple of vocab_multiple (model/vocab.py)."""
        m = max(self.vocab_multiple, 1)
        return -(-self.vocab_size // m) * m

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def block(self) -> layers.BlockOptions:
        return layers.BlockOptions(
            d_model=self.d_model,
            num_heads=self.num_heads,
            head_dim=self.resolved_head_dim,
            d_ff=self.d_ff,
            activation=self.activation,
            norm="layernorm",
            norm_eps=self.norm_eps,
            norm_position="post",
            causal=False,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            init_std=self.init_std,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )

    # Presets (Devlin et al. 2019; Liu et al. 2019; Sanh et al. 2019), sized as the released checkpoints.
    @classmethod
    def tiny(cls, **kw) -> BertConfig:
        return cls(**{**dict(vocab_size=4096, max_len=128, d_model=128, num_layers=2, num_heads=4, d_ff=512), **kw})

    @classmethod
    def base_uncased(cls, **kw) -> BertConfig:
        return cls(**kw)

    @classmethod
    def large_uncased(cls, **kw) -> BertConfig:
        return cls(**{**dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096), **kw})

    @classmethod
    def base_cased(cls, **kw) -> BertConfig:
        return cls(**{**dict(vocab_size=28996), **kw})

    @classmethod
    def large_cased(cls, **kw) -> BertConfig:
        return cls.large_uncased(**{**dict(vocab_size=28996), **kw})


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """RoBERTa: BERT's architecture with a byte-level BPE vocabulary, no NSP, padding-offset positions."""

    vocab_size: int = 50265
    type_vocab_size: int = 1
    norm_eps: float = 1e-5
    pad_token_id: int = 1
    pos_offset: int = 2
    positions_from_pad: bool = True
    pooler: bool = False
    nsp_head: bool = False

    @classmethod
    def base(cls, **kw) -> RobertaConfig:
        return cls(**kw)

    @classmethod
    def large(cls, **kw) -> RobertaConfig:
        return cls(**{**dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096), **kw})


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(BertConfig):
    """DistilBERT: six layers, no token types, no pooler."""

    num_layers: int = 6
    type_vocab_size: int = 0
    pooler: bool = False
    nsp_head: bool = False

    @classmethod
    def base(cls, **kw) -> DistilBertConfig:
        return cls(**kw)


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
        o = cfg.block()
        self.blocks = layers.BlockStack(
            lambda r: layers.Block(o, rngs=r), cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
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
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", None))
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
