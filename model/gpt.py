"""Decoder-only language models: GPT-2 and the decoder family, composed from model/layers.py."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model import layers, sharding
from model.layers import Array


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    max_len: int = 1024  # size of the learned position table (GPT-2's n_positions)
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 0  # 0: multi-head
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 0  # 0: 4 * d_model
    activation: str = "gelu_tanh"
    gated_mlp: bool = False
    use_bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    parallel_block: bool = False
    shared_parallel_norm: bool = True
    position: str = "learned"  # learned | rotary | none
    rotary_dim: int = 0  # with position='rotary'; 0: the whole head
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.d_model % self.num_heads and not self.head_dim:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.position not in ("learned", "rotary", "none"):
            raise ValueError(f"position={self.position!r}: choose learned, rotary or none")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def block(self) -> layers.BlockOptions:
        K = self.resolved_head_dim
        return layers.BlockOptions(
            d_model=self.d_model,
            num_heads=self.num_heads,
            head_dim=K,
            d_ff=self.d_ff or 4 * self.d_model,
            num_kv_heads=self.num_kv_heads,
            activation=self.activation,
            gated_mlp=self.gated_mlp,
            use_bias=self.use_bias,
            norm=self.norm,
            norm_eps=self.norm_eps,
            norm_bias=self.norm_bias,
            norm_position="pre",
            parallel_block=self.parallel_block,
            shared_parallel_norm=self.shared_parallel_norm,
            causal=True,
            rotary_dim=(self.rotary_dim or K) if self.position == "rotary" else 0,
            rotary_base=self.rotary_base,
            rotary_interleaved=self.rotary_interleaved,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            init_std=self.init_std,
            # GPT-2: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = 2 per layer.
            out_init_std=self.init_std / math.sqrt(2 * self.num_layers),
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )

    # Presets. Sizes from the GPT-2 paper / OpenAI's released checkpoints.
    @classmethod
    def tiny(cls, **kw) -> GPTConfig:
        return cls(**{**dict(vocab_size=4096, max_len=128, d_model=128, num_layers=4, num_heads=4), **kw})

    @classmethod
    def gpt2_small(cls, **kw) -> GPTConfig:
        return cls(**kw)

    @classmethod
    def gpt2_medium(cls, **kw) -> GPTConfig:
        return cls(**{**dict(d_model=1024, num_layers=24, num_heads=16), **kw})

    @classmethod
    def gpt2_large(cls, **kw) -> GPTConfig:
        return cls(**{**dict(d_model=1280, num_layers=36, num_heads=20), **kw})

    @classmethod
    def gpt2_xl(cls, **kw) -> GPTConfig:
        return cls(**{**dict(d_model=1600, num_layers=48, num_heads=25), **kw})


class GPT(nnx.Module):
    """Token (+ learned position) embeddings -> N pre-norm causal blocks -> final norm -> LM head."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        o = cfg.block()
        self.embed = layers.param(rngs, layers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if cfg.position == "learned":
            # GPT-2 initialises positions with std 0.01; HF uses initializer_range (0.02). Either is fine.
            self.pos_embed = layers.param(rngs, layers.normal(0.01), (cfg.max_len, cfg.d_model), (None, "embed"))
        else:
            self.pos_embed = None
        self.blocks = layers.BlockStack(
            lambda r: layers.Block(o, rngs=r), cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
        self.final_norm = layers.Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, bias=cfg.norm_bias, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = layers.param(
                rngs, layers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab")
            )

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
    ) -> Array:
        """Logits (B, L, V) in float32. ``attention_mask`` is the Hugging Face padding mask (1 = token);
        ``segment_ids``/``positions`` describe packed rows (segment 0 = padding); ``inputs_embeds``
        replaces the token-embedding lookup (B, L, D). ``return_hidden``: the final-normed hidden states
        instead, for losses fused with the output projection (model/lm_head.py)."""
        cfg = self.cfg
        dtype = layers.DTYPES[cfg.dtype]
        B, L = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        rng_embed, rng_blocks = jax.random.split(rng) if rng is not None else (None, None)

        x_BLD = jnp.take(self.embed[...], input_ids, axis=0) if inputs_embeds is None else inputs_embeds
        if self.pos_embed is not None:
            x_BLD = x_BLD + jnp.take(self.pos_embed[...], positions, axis=0)
        x_BLD = layers.dropout(x_BLD.astype(dtype), cfg.dropout, rng_embed)
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", None))

        mask = layers.make_attention_mask(segment_ids, segment_ids, causal=True)
        x_BLD = self.blocks(x_BLD, mask_B1LS=mask, positions_BL=positions, rng=rng_blocks)
        x_BLD = self.final_norm(x_BLD)
        if return_hidden:
            return x_BLD
        if cfg.tie_embeddings:
            logits_BLV = layers.unembed(x_BLD, self.embed[...].astype(dtype))
        else:
            logits_BLV = jnp.einsum("BLD,DV->BLV", x_BLD, self.lm_head[...].astype(dtype))
        return sharding.constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "vocab"))

    def output_projection(self) -> tuple[Array, Array | None]:
        """The LM head as (w_VD, bias_V or None), compute dtype: logits = hidden @ w_VD^T + bias_V. Every
        step between the final norm and the logits must be in here: the fused loss uses only this."""
        dtype = layers.DTYPES[self.cfg.dtype]
        w_VD = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...].T
        bias = getattr(self, "lm_head_bias", None)  # GPT-J's head has one
        return w_VD.astype(dtype), None if bias is None else bias[...].astype(dtype)
