"""Decoder-only language models: GPT-2 and the decoder family (GPT-3, GPT-Neo, GPT-J, GPT-NeoX, OPT, BLOOM,
LLaMA, PaLM, Chinchilla, Gopher), composed from model/layers.py. Every family is a set of option values."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import layers, vocab
from podformer.model.kv_cache import KVCache
from podformer.model.layers import Array

POSITIONS = ("learned", "rotary", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257  # the tokenizer's
    # The token tables have padded_vocab_size rows (a multiple of this; 1: none), so they shard over tensor;
    # the padding is masked out of every softmax and never leaves the model (model/vocab.py).
    vocab_multiple: int = 128
    max_len: int = 1024  # longest sequence; with learned positions the table has max_len + pos_offset rows
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 0  # 0: multi-head; 1: multi-query (PaLM); else grouped-query (LLaMA-2 70B)
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 0  # 0: 4 * d_model
    activation: str = "gelu_tanh"
    gated_mlp: bool = False
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    embed_norm: bool = False  # LayerNorm right after the token embedding (BLOOM)
    parallel_block: bool = False
    shared_parallel_norm: bool = True
    position: str = "learned"  # learned | rotary | alibi | none
    pos_offset: int = 0  # learned positions: position p reads row p + pos_offset (OPT: 2)
    positions_from_mask: bool = False  # without explicit positions, count only unpadded tokens (OPT)
    rotary_dim: int = 0  # with position='rotary'; 0: the whole head
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    # Per-layer attention kind, 'global' or 'local' (a causal window of window_size keys); () = all global.
    attention_layers: tuple[str, ...] = ()
    window_size: int = 256
    tie_embeddings: bool = True
    lm_head_bias: bool = False  # GPT-J's output projection has a bias
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
        if self.position not in POSITIONS:
            raise ValueError(f"position={self.position!r}: choose one of {', '.join(POSITIONS)}")
        object.__setattr__(self, "attention_layers", tuple(self.attention_layers))  # configs may hand a list
        if self.attention_layers and (
            len(self.attention_layers) != self.num_layers or set(self.attention_layers) - {"global", "local"}
        ):
            raise ValueError(f"attention_layers needs num_layers={self.num_layers} entries of 'global' or 'local'")

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the token tables: vocab_size rounded up to a multiple of vocab_multiple (model/vocab.py)."""
        m = max(self.vocab_multiple, 1)
        return -(-self.vocab_size // m) * m

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
            qkv_bias=self.qkv_bias,
            out_bias=self.attn_out_bias,
            mlp_bias=self.mlp_bias,
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
            attn_scale=self.attn_scale,
            dropout=self.dropout,
            attention_dropout=self.attention_dropout,
            init_std=self.init_std,
            # GPT-2: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = 2 per layer.
            out_init_std=self.init_std / math.sqrt(2 * self.num_layers),
            dtype=self.dtype,
            attention_impl=self.attention_impl,
        )

    @classmethod
    def tiny(cls, **kw) -> GPTConfig:
        return cls(**{**dict(vocab_size=4096, max_len=128, d_model=128, num_layers=4, num_heads=4), **kw})


# The families' shared settings, then each preset's sizes: (layers, d_model, heads, extra fields).
_GPT3 = dict(max_len=2048)
# GPT-Neo: alternating global and local (256-token window) attention, no attention scaling, no q/k/v bias.
_NEO = dict(max_len=2048, attn_scale=1.0, qkv_bias=False, window_size=256)
_OPT = dict(vocab_size=50272, max_len=2048, activation="relu", pos_offset=2, positions_from_mask=True)
_BLOOM = dict(vocab_size=250880, max_len=2048, position="alibi", embed_norm=True)
_ROPE = dict(position="rotary", norm="rmsnorm", activation="silu", gated_mlp=True, tie_embeddings=False)
_NOBIAS = dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False)
_LLAMA = dict(vocab_size=32000, max_len=2048, norm_eps=1e-6, **_ROPE, **_NOBIAS)
# PaLM: SwiGLU, parallel block, multi-query attention, rotary, shared input/output embedding, "no biases
# in any of the dense kernels or layer norms".
_PALM = dict(vocab_size=256000, max_len=2048, num_kv_heads=1, head_dim=256, parallel_block=True, norm_bias=False)
_PALM.update(position="rotary", activation="silu", gated_mlp=True, **_NOBIAS)
# Gopher / Chinchilla: RMSNorm and Transformer-XL relative positions; rotary stands in for the latter here
# (its per-layer d_model x d_model position projection is not modelled, ~7% of the published totals).
# Tied embeddings: the papers' parameter totals add up with one 32k table, not two.
_DEEPMIND = dict(vocab_size=32000, max_len=2048, position="rotary", norm="rmsnorm")

PRESETS: dict[str, dict] = {
    # GPT-2 (Radford et al. 2019; OpenAI's released checkpoints).
    "gpt2_small": dict(),
    "gpt2_medium": dict(d_model=1024, num_layers=24, num_heads=16),
    "gpt2_large": dict(d_model=1280, num_layers=36, num_heads=20),
    "gpt2_xl": dict(d_model=1600, num_layers=48, num_heads=25),
    # GPT-3 (Brown et al. 2020, table 2.1): the GPT-2 architecture at 2048 tokens. GPT-3 alternated dense and
    # locally banded sparse attention layers; these presets use dense attention in every layer. The table's
    # 1.3B (24 heads of 128 in a 2048 model) and 13B (d_model 5140 over 40 heads of 128) are inconsistent
    # with their own totals; 16 heads and d_model 5120 are what the totals and re-implementations use.
    "gpt3_125m": dict(_GPT3, d_model=768, num_layers=12, num_heads=12),
    "gpt3_350m": dict(_GPT3, d_model=1024, num_layers=24, num_heads=16),
    "gpt3_760m": dict(_GPT3, d_model=1536, num_layers=24, num_heads=16),
    "gpt3_1_3b": dict(_GPT3, d_model=2048, num_layers=24, num_heads=16),
    "gpt3_2_7b": dict(_GPT3, d_model=2560, num_layers=32, num_heads=32),
    "gpt3_6_7b": dict(_GPT3, d_model=4096, num_layers=32, num_heads=32),
    "gpt3_13b": dict(_GPT3, d_model=5120, num_layers=40, num_heads=40),
    "gpt3_175b": dict(_GPT3, d_model=12288, num_layers=96, num_heads=96),
    # Megatron-Turing NLG 530B (Smith et al. 2022, section 3.1): the GPT-3 architecture, wider and deeper.
    "mt_nlg_530b": dict(_GPT3, d_model=20480, num_layers=105, num_heads=128),
    # GPT-Neo (EleutherAI).
    "gpt_neo_125m": dict(_NEO, d_model=768, num_layers=12, num_heads=12, attention_layers=("global", "local") * 6),
    "gpt_neo_1_3b": dict(_NEO, d_model=2048, num_layers=24, num_heads=16, attention_layers=("global", "local") * 12),
    "gpt_neo_2_7b": dict(_NEO, d_model=2560, num_layers=32, num_heads=20, attention_layers=("global", "local") * 16),
    # GPT-J 6B: rotary on 64 of 256 head dims (pairs interleaved), one LayerNorm feeding attention and MLP in
    # parallel, no attention biases, untied output projection with a bias.
    "gptj_6b": dict(
        vocab_size=50400,
        max_len=2048,
        d_model=4096,
        num_layers=28,
        num_heads=16,
        position="rotary",
        rotary_dim=64,
        rotary_interleaved=True,
        parallel_block=True,
        qkv_bias=False,
        attn_out_bias=False,
        tie_embeddings=False,
        lm_head_bias=True,
    ),  # fmt: skip
    # GPT-NeoX 20B: rotary on a quarter of each head (halves), parallel residual with two LayerNorms.
    "gpt_neox_20b": dict(
        vocab_size=50432,
        max_len=2048,
        d_model=6144,
        num_layers=44,
        num_heads=64,
        activation="gelu",
        position="rotary",
        rotary_dim=24,
        parallel_block=True,
        shared_parallel_norm=False,
        tie_embeddings=False,
    ),  # fmt: skip
    # OPT (Zhang et al. 2022): ReLU, learned positions offset by 2. (OPT-350m is post-LayerNorm with a
    # projected embedding, a different architecture, and has no preset.)
    "opt_125m": dict(_OPT, d_model=768, num_layers=12, num_heads=12),
    "opt_1_3b": dict(_OPT, d_model=2048, num_layers=24, num_heads=32),
    "opt_2_7b": dict(_OPT, d_model=2560, num_layers=32, num_heads=32),
    "opt_6_7b": dict(_OPT, d_model=4096, num_layers=32, num_heads=32),
    "opt_13b": dict(_OPT, d_model=5120, num_layers=40, num_heads=40),
    "opt_30b": dict(_OPT, d_model=7168, num_layers=48, num_heads=56),
    "opt_66b": dict(_OPT, d_model=9216, num_layers=64, num_heads=72),
    "opt_175b": dict(_OPT, d_model=12288, num_layers=96, num_heads=96),
    # BLOOM (BigScience 2022): ALiBi, LayerNorm on the embedding.
    "bloom_560m": dict(_BLOOM, d_model=1024, num_layers=24, num_heads=16),
    "bloom_1b1": dict(_BLOOM, d_model=1536, num_layers=24, num_heads=16),
    "bloom_1b7": dict(_BLOOM, d_model=2048, num_layers=24, num_heads=16),
    "bloom_3b": dict(_BLOOM, d_model=2560, num_layers=30, num_heads=32),
    "bloom_7b1": dict(_BLOOM, d_model=4096, num_layers=30, num_heads=32),
    "bloom_176b": dict(_BLOOM, d_model=14336, num_layers=70, num_heads=112),
    # LLaMA (Touvron et al. 2023): RMSNorm, SwiGLU, rotary; LLaMA-2 70B and LLaMA-3 use grouped-query attention.
    "llama_7b": dict(_LLAMA, d_model=4096, num_layers=32, num_heads=32, d_ff=11008),
    "llama_13b": dict(_LLAMA, d_model=5120, num_layers=40, num_heads=40, d_ff=13824),
    "llama_33b": dict(_LLAMA, d_model=6656, num_layers=60, num_heads=52, d_ff=17920),
    "llama_65b": dict(_LLAMA, d_model=8192, num_layers=80, num_heads=64, d_ff=22016),
    "llama2_70b": dict(
        _LLAMA, max_len=4096, norm_eps=1e-5, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, d_ff=28672
    ),
    "llama3_8b": dict(
        _LLAMA,
        vocab_size=128256,
        max_len=8192,
        norm_eps=1e-5,
        rotary_base=500000.0,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        d_ff=14336,
    ),  # fmt: skip
    # PaLM (Chowdhery et al. 2022, table 1): d_ff = 4 d_model.
    "palm_8b": dict(_PALM, d_model=4096, num_layers=32, num_heads=16),
    "palm_62b": dict(_PALM, d_model=8192, num_layers=64, num_heads=32),
    "palm_540b": dict(_PALM, d_model=18432, num_layers=118, num_heads=48),
    # Gopher (Rae et al. 2021, table 1) and Chinchilla (Hoffmann et al. 2022, table 4): heads of 128.
    "gopher_7b": dict(_DEEPMIND, d_model=4096, num_layers=32, num_heads=32),
    "gopher_280b": dict(_DEEPMIND, d_model=16384, num_layers=80, num_heads=128),
    "chinchilla_70b": dict(_DEEPMIND, d_model=8192, num_layers=80, num_heads=64),
}


def _preset(fields: dict):
    return classmethod(lambda cls, **kw: cls(**{**fields, **kw}))


for _name, _fields in PRESETS.items():
    setattr(GPTConfig, _name, _preset(_fields))


class GPT(nnx.Module):
    """Token (+ learned position) embeddings -> N pre-norm causal blocks -> final norm -> LM head."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        o = cfg.block()
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
        self.blocks = layers.BlockStack(
            lambda r: layers.Block(o, rngs=r), cfg.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs
        )
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
        x_BLD = sharding.constrain(x_BLD, ("batch", "length", None))

        if cache is None:
            mask = layers.make_attention_mask(segment_ids, segment_ids, causal=True)
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
