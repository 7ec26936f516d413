"""Encoder-decoders: T5 (v1.0, v1.1, mT5) and BART, composed from model/layers.py.

One module: a shared token embedding, an encoder stack and a decoder stack (self-, cross-attention and
MLP blocks), and the LM head. T5 and BART differ only in options: relative position buckets vs learned
positions, RMS-style vs mean-centred LayerNorm, pre- vs post-norm, ReLU / gated GELU / GELU, biases,
an embedding LayerNorm, a final LayerNorm, and how the output projection is tied and scaled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import layers, vocab
from podformer.model.kv_cache import KVCache
from podformer.model.layers import Array
from podformer.model.t5_config import T5_PRESETS, BartConfig, T5Config  # noqa: F401 (re-exported)


def block_options(cfg: T5Config, *, decoder: bool) -> layers.BlockOptions:
    """An encoder block, or a causal decoder block with cross-attention."""
    return layers.block_options(
        cfg,
        gated_mlp=cfg.gated_mlp,
        qkv_bias=cfg.use_bias,
        out_bias=cfg.use_bias,
        mlp_bias=cfg.use_bias,
        norm=cfg.norm,
        norm_bias=cfg.use_bias,
        norm_position=cfg.norm_position,
        causal=decoder,
        cross_attention=decoder,
        attn_scale=cfg.attn_scale,
    )


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
        o = block_options(cfg, decoder=decoder)
        n = cfg.decoder_layers if decoder else cfg.num_layers
        self.blocks = layers.stack(o, n, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
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
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "activation_embed"))

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
