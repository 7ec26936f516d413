"""Encoder-decoders: T5 (v1.0, v1.1, mT5) and BART, composed from model/layers.py.

One module: a shared token embedding, an encoder stack and a decoder stack (self-, cross-attention and
MLP blocks), and the LM head. T5 and BART differ only in options: relative position buckets vs learned
positions, RMS-style vs mean-centred LayerNorm, pre- vs post-norm, ReLU / gated GELU / GELU, biases,
an embedding LayerNorm, a final LayerNorm, and how the output projection is tied and scaled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import layers, vocab
from podformer.model.kv_cache import KVCache
from podformer.model.layers import Array


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128  # the tokenizer's
    # The token tables have padded_vocab_size rows (a multiple of this; 1: none), so they shard over tensor;
    # the padding is masked out of every softmax and never leaves the model (model/vocab.py).
    vocab_multiple: int = 128
    d_model: int = 512
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int = 0  # 0: num_layers
    num_heads: int = 8
    head_dim: int = 64  # T5's d_kv: num_heads * head_dim need not equal d_model (T5 3B, 11B)
    d_ff: int = 2048
    activation: str = "relu"
    gated_mlp: bool = False
    use_bias: bool = False  # biases in every projection (BART) or none (T5)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_position: str = "pre"
    position: str = "relative"  # relative (T5 buckets) | learned (BART)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    max_len: int = 1024  # learned positions: table rows = max_len + pos_offset
    pos_offset: int = 0  # BART: 2
    embed_norm: bool = False  # LayerNorm on the embeddings (BART's layernorm_embedding)
    final_norm: bool = True  # a norm after each stack's last block (T5; not BART)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(d_model) (BART's scale_embedding)
    tie_embeddings: bool = True
    scale_output: bool = True  # decoder output * d_model**-0.5 before the LM head (T5 v1.0's, with tied head)
    logits_bias: bool = False  # BART's final_logits_bias (a saved, untrained buffer)
    attn_scale: float = 1.0  # T5 folds 1/sqrt(head_dim) into its init: 1.0; 0: 1/sqrt(head_dim) (BART)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.position not in ("relative", "learned"):
            raise ValueError(f"position={self.position!r}: choose relative or learned")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the token tables: vocab_size rounded up to a multiple of vocab_multiple (model/vocab.py)."""
        m = max(self.vocab_multiple, 1)
        return -(-self.vocab_size // m) * m

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def block(self, *, decoder: bool) -> layers.BlockOptions:
        return layers.BlockOptions(
            d_model=self.d_model,
            num_heads=self.num_heads,
            head_dim=self.resolved_head_dim,
            d_ff=self.d_ff,
            activation=self.activation,
            gated_mlp=self.gated_mlp,
            qkv_bias=self.use_bias,
            out_bias=self.use_bias,
            mlp_bias=self.use_bias,
            norm=self.norm,
            norm_eps=self.norm_eps,
            norm_bias=self.use_bias,
            norm_position=self.norm_position,
            causal=decoder,
            cross_attention=decoder,
            attn_scale=self.attn_scale,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            init_std=self.init_std,
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )

    # T5 (Raffel et al. 2020) and T5 v1.1 / mT5 (Xue et al. 2021), sized as Google's released checkpoints.
    @classmethod
    def tiny(cls, **kw) -> T5Config:
        fields = dict(vocab_size=4096, d_model=128, num_layers=2, num_heads=4, head_dim=32, d_ff=512, dropout=0.0)
        return cls(**{**fields, **kw})


def _sizes(d_model, num_layers, num_heads, head_dim, d_ff):
    return dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, d_ff=d_ff)


# v1.1 and mT5: gated GELU, untied output projection without the rescale, no dropout in pretraining.
_V1_1 = dict(activation="gelu_tanh", gated_mlp=True, tie_embeddings=False, scale_output=False, dropout=0.0)
_MT5 = dict(_V1_1, vocab_size=250112)
T5_PRESETS = {
    "small": _sizes(512, 6, 8, 64, 2048),
    "base": _sizes(768, 12, 12, 64, 3072),
    "large": _sizes(1024, 24, 16, 64, 4096),
    "t5_3b": _sizes(1024, 24, 32, 128, 16384),
    "t5_11b": _sizes(1024, 24, 128, 128, 65536),
    "v1_1_small": dict(_V1_1, **_sizes(512, 8, 6, 64, 1024)),
    "v1_1_base": dict(_V1_1, **_sizes(768, 12, 12, 64, 2048)),
    "v1_1_large": dict(_V1_1, **_sizes(1024, 24, 16, 64, 2816)),
    "v1_1_xl": dict(_V1_1, **_sizes(2048, 24, 32, 64, 5120)),
    "v1_1_xxl": dict(_V1_1, **_sizes(4096, 24, 64, 64, 10240)),
    "mt5_small": dict(_MT5, **_sizes(512, 8, 6, 64, 1024)),
    "mt5_base": dict(_MT5, **_sizes(768, 12, 12, 64, 2048)),
    "mt5_large": dict(_MT5, **_sizes(1024, 24, 16, 64, 2816)),
    "mt5_xl": dict(_MT5, **_sizes(2048, 24, 32, 64, 5120)),
    "mt5_xxl": dict(_MT5, **_sizes(4096, 24, 64, 64, 10240)),
}


@dataclasses.dataclass(frozen=True)
class BartConfig(T5Config):
    """BART (Lewis et al. 2020): post-LayerNorm, GELU, biases, learned positions offset by 2, a LayerNorm
    on the embeddings, no final LayerNorm, tied output projection plus final_logits_bias."""

    vocab_size: int = 50265
    d_model: int = 768
    num_layers: int = 6
    num_heads: int = 12
    head_dim: int = 0
    d_ff: int = 3072
    activation: str = "gelu"
    use_bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "post"
    position: str = "learned"
    max_len: int = 1024
    pos_offset: int = 2
    embed_norm: bool = True
    final_norm: bool = False
    scale_output: bool = False
    logits_bias: bool = True
    attn_scale: float = 0.0

    @classmethod
    def tiny(cls, **kw) -> BartConfig:
        fields = dict(vocab_size=4096, max_len=128, d_model=128, num_layers=2, num_heads=4, d_ff=512, dropout=0.0)
        return cls(**{**fields, **kw})

    @classmethod
    def base(cls, **kw) -> BartConfig:
        return cls(**kw)

    @classmethod
    def large(cls, **kw) -> BartConfig:
        return cls(**{**dict(d_model=1024, num_layers=12, num_heads=16, d_ff=4096), **kw})


def _preset(fields: dict):
    return classmethod(lambda cls, **kw: cls(**{**fields, **kw}))


for _name, _fields in T5_PRESETS.items():
    setattr(T5Config, _name, _preset(_fields))


class Stack(nnx.Module):
    """One side of the encoder-decoder: positions, embedding norm, blocks, final norm. The token
    embedding is shared by both sides and owned by the model, so it is passed in at call time."""

    def __init__(self, cfg: T5Config, *, decoder: bool, rngs: nnx.Rngs):
        self.cfg, self.decoder = cfg, decoder
        D = cfg.d_model
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.use_bias, rngs=rngs)
        if cfg.position == "learned":
            rows = cfg.max_len + cfg.pos_offset
            self.pos_embed = layers.param(rngs, layers.normal(cfg.init_std), (rows, D), (None, "embed"))
            self.rel_bias = None
        else:
            self.pos_embed = None
            self.rel_bias = layers.RelativePositionBias(
                cfg.num_heads,
                num_buckets=cfg.relative_buckets,
                max_distance=cfg.relative_max_distance,
                bidirectional=not decoder,
                rngs=rngs,
            )
        self.embed_norm = layers.Norm(D, **norm) if cfg.embed_norm else None
        o = cfg.block(decoder=decoder)
        n = cfg.decoder_layers if decoder else cfg.num_layers
        self.blocks = layers.BlockStack(
            lambda r: layers.Block(o, rngs=r), n, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
        self.final_norm = layers.Norm(D, **norm) if cfg.final_norm else None

    def __call__(
        self,
        ids_BL: Array,
        embed_VD: Array,
        segment_ids_BL: Array,
        positions_BL: Array,
        *,
        encoded_BSD: Array | None = None,
        encoder_segment_ids_BS: Array | None = None,
        rng: Array | None = None,
        cache: KVCache | None = None,
    ) -> Array | tuple[Array, KVCache]:
        """Hidden states (B, L, D); with a decoding ``cache`` (decoder only), (hidden, cache): the L
        tokens follow the cached ones (decoder rows have no padding: positions are slot indices), and
        ``encoded_BSD`` is given at the first call only (its cross-attention keys/values are cached)."""
        cfg = self.cfg
        dtype = layers.DTYPES[cfg.dtype]
        rng_embed, rng_blocks, rng_out = jax.random.split(rng, 3) if rng is not None else (None, None, None)
        x_BLD = jnp.take(embed_VD, ids_BL, axis=0)
        if cfg.scale_embeddings:
            x_BLD = x_BLD * jnp.sqrt(jnp.float32(cfg.d_model))
        if self.pos_embed is not None:
            x_BLD = x_BLD + layers.lookup(self.pos_embed, positions_BL, cfg.pos_offset)
        if self.embed_norm is not None:
            x_BLD = self.embed_norm(x_BLD)
        x_BLD = layers.dropout(x_BLD.astype(dtype), cfg.dropout, rng_embed)
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", None))

        L = ids_BL.shape[1]
        if cache is None:
            mask = layers.make_attention_mask(segment_ids_BL, segment_ids_BL, causal=self.decoder)
            bias = None if self.rel_bias is None else self.rel_bias(L, L)
        else:
            mask = cache.self_mask(L)
            bias = None if self.rel_bias is None else self.rel_bias(L, cache.slots, q_offset=cache.index)
        kwargs = {}
        if self.decoder:
            kwargs = dict(
                encoded_BSD=encoded_BSD,
                cross_mask_B1LS=layers.make_attention_mask(segment_ids_BL, encoder_segment_ids_BS, causal=False),
            )
        if cache is not None:
            kwargs["cache"] = cache
        x_BLD = self.blocks(x_BLD, mask_B1LS=mask, positions_BL=positions_BL, bias_BHLS=bias, rng=rng_blocks, **kwargs)
        if cache is not None:
            x_BLD, cache = x_BLD
        if self.final_norm is not None:
            x_BLD = layers.dropout(self.final_norm(x_BLD), cfg.dropout, rng_out)
        return x_BLD if cache is None else (x_BLD, cache.advance(L))


def _segments_and_positions(ids: Array, mask: Array | None, segment_ids: Array | None, positions: Array | None):
    B, L = ids.shape
    if segment_ids is None:
        segment_ids = jnp.ones((B, L), jnp.int32) if mask is None else mask.astype(jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    return segment_ids, positions


class T5(nnx.Module):
    """Shared embedding -> encoder stack; shared embedding -> decoder stack (attending to the encoder) ->
    LM head (the shared embedding, optionally rescaled, or an untied projection; optional logits bias)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, V = cfg.d_model, cfg.padded_vocab_size
        # T5 initialises its embedding with std 1.0 (factor * 1.0 in the reference init).
        std = 1.0 if cfg.position == "relative" else cfg.init_std
        self.embed = layers.param(rngs, vocab.init(layers.normal(std), cfg.vocab_size), (V, D), ("vocab", "embed"))
        self.encoder = Stack(cfg, decoder=False, rngs=rngs)
        self.decoder = Stack(cfg, decoder=True, rngs=rngs)
        if not cfg.tie_embeddings:
            head_init = vocab.init(layers.normal(cfg.init_std), cfg.vocab_size, 1)
            self.lm_head = layers.param(rngs, head_init, (D, V), ("embed", "vocab"))
        self.logits_bias = layers.buffer((V,), ("vocab",)) if cfg.logits_bias else None

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        rng: Array | None = None,
    ) -> Array:
        segment_ids, positions = _segments_and_positions(input_ids, attention_mask, segment_ids, positions)
        return self.encoder(input_ids, self.embed[...], segment_ids, positions, rng=rng)

    def decode(
        self,
        decoder_input_ids: Array,
        encoded_BSD: Array,
        encoder_segment_ids: Array,
        decoder_attention_mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        rng: Array | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        padded_vocab: bool = False,
    ) -> Array | tuple[Array, KVCache]:
        """LM logits (B, L, V) in float32 for the decoder inputs, given the encoder's output, over the
        tokenizer's vocabulary (``padded_vocab``: over the padded one, the padding at vocab.PAD_LOGIT: the
        losses' view, which stays sharded over tensor).

        Decoding: with a ``cache`` (``init_cache``), the L tokens follow the cached ones and (logits,
        cache) is returned; pass ``encoded_BSD`` at the first call and None afterwards (its
        cross-attention keys/values are cached then). ``last_only``: the last position's logits only."""
        if cache is not None:
            if decoder_attention_mask is not None or segment_ids is not None:
                raise ValueError("cached decoding takes unpadded decoder rows: no decoder mask or segments")
            B, L = decoder_input_ids.shape
            positions = cache.index + jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
            cache = cache.append(jnp.ones((B, L), bool), positions)
        seg, pos = _segments_and_positions(decoder_input_ids, decoder_attention_mask, segment_ids, positions)
        x_BLD = self.decoder(
            decoder_input_ids,
            self.embed[...],
            seg,
            pos,
            encoded_BSD=encoded_BSD,
            encoder_segment_ids_BS=encoder_segment_ids,
            rng=rng,
            cache=cache,
        )
        if cache is not None:
            x_BLD, cache = x_BLD
        if last_only:
            x_BLD = x_BLD[:, -1:]
        logits_BLV = self._logits(x_BLD, padded_vocab)
        return logits_BLV if cache is None else (logits_BLV, cache)

    def init_cache(self, batch: int, slots: int, source_len: int) -> KVCache:
        """An empty decoder cache: ``slots`` decoder tokens, cross-attention over ``source_len`` encoder ones."""
        cfg = self.cfg
        return KVCache.create(
            layers=cfg.decoder_layers,
            batch=batch,
            slots=slots,
            kv_heads=cfg.num_heads,
            head_dim=cfg.resolved_head_dim,
            dtype=layers.DTYPES[cfg.dtype],
            source_len=source_len,
        )

    def _logits(self, x_BLD: Array, padded_vocab: bool) -> Array:
        cfg = self.cfg
        dtype = x_BLD.dtype
        if cfg.scale_output:
            x_BLD = x_BLD * (cfg.d_model**-0.5)
        if cfg.tie_embeddings:
            logits_BLV = layers.unembed(x_BLD, self.embed[...].astype(dtype))
        else:
            logits_BLV = jnp.einsum("BLD,DV->BLV", x_BLD, self.lm_head[...].astype(dtype))
        if self.logits_bias is not None:
            logits_BLV = logits_BLV + self.logits_bias[...].astype(dtype)
        logits_BLV = sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
        return vocab.mask(logits_BLV, cfg.vocab_size) if padded_vocab else logits_BLV[..., : cfg.vocab_size]

    def __call__(
        self,
        input_ids: Array,
        decoder_input_ids: Array,
        attention_mask: Array | None = None,
        decoder_attention_mask: Array | None = None,
        *,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        rng: Array | None = None,
        padded_vocab: bool = False,
    ) -> Array:
        """LM logits (B, L_decoder, V) in float32 (``padded_vocab`` as in ``decode``). Masks are Hugging
        Face padding masks (1 = token); the segment/position arguments describe packed rows (segment 0 =
        padding; decoder segment i attends to encoder segment i)."""
        rng_enc, rng_dec = jax.random.split(rng) if rng is not None else (None, None)
        enc_seg, enc_pos = _segments_and_positions(input_ids, attention_mask, encoder_segment_ids, encoder_positions)
        encoded = self.encode(input_ids, segment_ids=enc_seg, positions=enc_pos, rng=rng_enc)
        return self.decode(
            decoder_input_ids,
            encoded,
            enc_seg,
            decoder_attention_mask,
            segment_ids=decoder_segment_ids,
            positions=decoder_positions,
            rng=rng_dec,
            padded_vocab=padded_vocab,
        )
