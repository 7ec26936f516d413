"""Decoder-only language models: GPT-2 and the decoder family (GPT-3, GPT-Neo, GPT-J, GPT-NeoX, OPT, BLOOM,
LLaMA, PaLM, Chinchilla, Gopher), composed from model/layers.py. Every family is a set of option values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import layers, vocab
from podformer.model.gpt_config import POSITIONS, PRESETS, GPTConfig  # noqa: F401 (re-exported)
from podformer.model.kv_cache import KVCache
from podformer.model.layers import Array


def block_options(cfg: GPTConfig) -> layers.BlockOptions:
    """Pre-norm causal blocks with the decoder family's options."""
    return layers.block_options(
        cfg,
        num_kv_heads=cfg.num_kv_heads,
        gated_mlp=cfg.gated_mlp,
        qkv_bias=cfg.qkv_bias,
        out_bias=cfg.attn_out_bias,
        mlp_bias=cfg.mlp_bias,
        norm=cfg.norm,
        norm_bias=cfg.norm_bias,
        norm_position="pre",
        parallel_block=cfg.parallel_block,
        shared_parallel_norm=cfg.shared_parallel_norm,
        causal=True,
        qk_norm=cfg.qk_norm,
        rotary_dim=(cfg.rotary_dim or cfg.resolved_head_dim) if cfg.position == "rotary" else 0,
        rotary_base=cfg.rotary_base,
        rotary_interleaved=cfg.rotary_interleaved,
        attn_scale=cfg.attn_scale,
        # GPT-2: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = 2 per layer.
        out_init_std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
    )


class GPT(nnx.Module):
    """Token (+ learned position) embeddings -> N pre-norm causal blocks -> final norm -> LM head."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        o = block_options(cfg)
        D, V = cfg.d_model, cfg.padded_vocab_size
        init = layers.normal(cfg.init_std)
        self.embed = layers.param(rngs, vocab.init(init, cfg.vocab_size), (V, D), ("vocab", "embed"))
        if cfg.position == "learned":
            # GPT-2 initialises positions with std 0.01; HF uses initializer_range (0.02). Either is fine.
            rows = cfg.max_len + cfg.pos_offset
            self.pos_embed = layers.param(rngs, layers.normal(0.01), (rows, D), (None, "embed"))
        else:
            self.pos_embed = None
        norm = dict(kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, rngs=rngs)
        self.embed_norm = layers.Norm(D, **norm) if cfg.embed_norm else None
        self.blocks = layers.stack(o, cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
        self.final_norm = layers.Norm(D, **norm)
        if not cfg.tie_embeddings:
            self.lm_head = layers.param(rngs, vocab.init(init, cfg.vocab_size, 1), (D, V), ("embed", "vocab"))
        self.lm_head_bias = layers.Bias(V, ("vocab",), rngs=rngs) if cfg.lm_head_bias else None

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
        return_hidden: bool = False,
        cache: KVCache | None = None,
        last_only: bool = False,
        padded_vocab: bool = False,
    ) -> Array | tuple[Array, KVCache]:
        """Logits (B, L, V) in float32 over the tokenizer's vocabulary (``padded_vocab``: over the padded
        one, the padding at vocab.PAD_LOGIT: the losses' view, which stays sharded over tensor).
        ``attention_mask`` is the Hugging Face padding mask (1 = token);
        ``segment_ids``/``positions`` describe packed rows (segment 0 = padding); ``inputs_embeds``
        replaces the token-embedding lookup (B, L, D). Decoders have no token types: ``token_type_ids``
        is accepted for a uniform signature and must be None. ``return_hidden``: the final-normed hidden
        states instead, for losses fused with the output projection (model/lm_head.py).

        Decoding: with a ``cache`` (``init_cache``) the L tokens are appended after the cached ones and
        (logits, cache) is returned. Each call's ``attention_mask`` marks its padding (a prompt is
        left-padded; default all tokens); positions count real tokens, as transformers' generate does.
        ``last_only``: logits of the last position only (B, 1, V)."""
        if token_type_ids is not None:
            raise ValueError("decoder-only models have no token types; pass token_type_ids=None")
        cfg = self.cfg
        dtype = layers.DTYPES[cfg.dtype]
        B, L = input_ids.shape
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("a decoding cache takes attention_mask (left padding), not packed segment_ids")
            valid = jnp.ones((B, L), bool) if attention_mask is None else attention_mask
            cache = cache.append(valid, positions)
            positions = cache.new_positions(L)
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if positions is None:
            if cfg.positions_from_mask and attention_mask is not None:
                positions = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
            else:
                positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        rng_embed, rng_blocks = jax.random.split(rng) if rng is not None else (None, None)

        x_BLD = layers.lookup(self.embed, input_ids) if inputs_embeds is None else inputs_embeds
        if self.pos_embed is not None:
            x_BLD = x_BLD + layers.lookup(self.pos_embed, positions, cfg.pos_offset)
        if self.embed_norm is not None:
            x_BLD = self.embed_norm(x_BLD)
        x_BLD = layers.dropout(x_BLD.astype(dtype), cfg.dropout, rng_embed)
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", "activation_embed"))

        if cache is None:
            mask = layers.make_attention_mask(segment_ids, segment_ids, causal=True)
            if cfg.attention_impl in ("flash", "auto"):  # the flash kernel masks from the ids themselves
                mask = layers.SegmentMask(segment_ids, segment_ids, causal=True)
            kv_positions = positions
        else:
            mask, kv_positions = cache.self_mask(L), cache.positions_BM
        bias = layers.alibi_bias(cfg.num_heads, kv_positions) if cfg.position == "alibi" else None
        per_layer = {}
        if "local" in cfg.attention_layers:
            windows = [cfg.window_size if kind == "local" else 0 for kind in cfg.attention_layers]
            per_layer["window"] = jnp.asarray(windows, jnp.int32)
        kw = dict(mask_B1LS=mask, positions_BL=positions, bias_BHLS=bias, per_layer=per_layer, rng=rng_blocks)
        if cache is None:
            x_BLD = self.blocks(x_BLD, **kw)
        else:
            x_BLD, cache = self.blocks(x_BLD, cache=cache, **kw)
            cache = cache.advance(L)
        if last_only:
            x_BLD = x_BLD[:, -1:]
        x_BLD = self.final_norm(x_BLD)
        if return_hidden:
            return x_BLD if cache is None else (x_BLD, cache)
        logits_BLV = self._logits(x_BLD, padded_vocab)
        return logits_BLV if cache is None else (logits_BLV, cache)

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty decoding cache for ``batch`` rows of up to ``slots`` tokens (prompt + generated)."""
        cfg = self.cfg
        return KVCache.create(
            layers=cfg.num_layers,
            batch=batch,
            slots=slots,
            kv_heads=cfg.num_kv_heads or cfg.num_heads,
            head_dim=cfg.resolved_head_dim,
            dtype=layers.DTYPES[cfg.dtype],
        )

    def _logits(self, x_BLD: Array, padded_vocab: bool) -> Array:
        cfg = self.cfg
        dtype = layers.DTYPES[cfg.dtype]
        if cfg.tie_embeddings:
            logits_BLV = layers.unembed(x_BLD, self.embed[...].astype(dtype))
        else:
            logits_BLV = jnp.einsum("BLD,DV->BLV", x_BLD, self.lm_head[...].astype(dtype))
        if self.lm_head_bias is not None:
            logits_BLV = self.lm_head_bias(logits_BLV)
        logits_BLV = sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))
        return vocab.mask(logits_BLV, cfg.vocab_size) if padded_vocab else logits_BLV[..., : cfg.vocab_size]

    def output_projection(self) -> tuple[Array, Array | None]:
        """The LM head as (w_VD, bias_V or None), compute dtype: logits = hidden @ w_VD^T + bias_V. Every
        step between the final norm and the logits must be in here: the fused loss uses only this. Both
        have cfg.padded_vocab_size rows: the loss masks those from cfg.vocab_size on."""
        dtype = layers.DTYPES[self.cfg.dtype]
        w_VD = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...].T
        bias = self.lm_head_bias  # GPT-J's head has one
        return w_VD.astype(dtype), None if bias is None else bias.bias[...].astype(dtype)
