"""The shared transformer blocks: every family in podformer is a composition of these.

Shape glossary (suffixes on array names, e.g. ``x_BLD``):
  B batch, L query length, S key/source length, D model width, H query heads, G key/value heads,
  K head dim, F mlp width, V vocab, N layers, P max positions.

Every parameter carries logical axis names from one small vocabulary
(batch, length, embed, heads, kv, mlp, vocab, layers); ``configs/common.py`` maps them to mesh axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from podformer.core import sharding
from podformer.model import kernels, moe, pipeline
from podformer.model.attention import (  # noqa: F401  (re-exported)
    SegmentMask,
    alibi_bias,
    attention,
    dense_mask,
    dropout,
    local_window_mask,
    make_attention_mask,
    t5_relative_buckets,
)
from podformer.model.config import ModelConfig
from podformer.model.kv_cache import KVCache

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Exact and tanh GELU are different functions: BERT/T5 use the exact erf form, GPT-2 the tanh one.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """Everything a transformer block can vary on; a family config produces one of these."""

    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    num_kv_heads: int = 0  # 0: same as num_heads (multi-head); 1: multi-query; else grouped-query
    activation: str = "gelu_tanh"
    gated_mlp: bool = False  # GLU-style MLP: act(x W_gate) * (x W_up)
    qkv_bias: bool = True  # biases of the query/key/value projections (GPT-Neo, GPT-J, LLaMA: none)
    out_bias: bool = True  # bias of the attention output projection (GPT-J, LLaMA, T5: none)
    mlp_bias: bool = True  # biases of the MLP projections (LLaMA, PaLM, T5: none)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's additive bias (RMSNorm never has one)
    norm_position: Literal["pre", "post"] = "pre"
    parallel_block: bool = False  # x + attn(norm(x)) + mlp(norm(x)) (GPT-J, NeoX, PaLM)
    shared_parallel_norm: bool = True  # parallel block: one norm feeds both branches (GPT-J, PaLM)
    causal: bool = True
    cross_attention: bool = False  # decoder block of an encoder-decoder
    qk_norm: bool = False  # RMSNorm of each query and key head over head_dim, before rotary (Qwen3, Gemma 3)
    rotary_dim: int = 0  # number of head dims that get rotary embeddings; 0 = none
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False  # GPT-J rotates pairs (0,1),(2,3)..; NeoX/LLaMA rotate halves
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim); T5 folds the scale into its init, GPT-Neo has none: 1.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    out_init_std: float = 0.0  # residual output projections; 0: init_std (GPT-2 scales by 1/sqrt(2N))
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention_impl: str = "xla"
    # Mixture of experts (ModelConfig's fields of the same names; model/moe.py)
    num_experts: int = 0
    moe_every: int = 1
    moe_first: bool = False
    expert_mlp: str = "same"
    experts_per_token: int = 2
    expert_d_ff: int = 0
    shared_experts: int = 0
    router_renormalize: bool = True
    router_jitter: float = 0.0
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25
    moe_group_size: int = 0
    expert_capacity: int = 0
    moe_lb_weight: float = 0.01
    moe_z_weight: float = 0.001

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def gated_experts(self) -> bool:
        return self.gated_mlp if self.expert_mlp == "same" else self.expert_mlp == "gated"

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def block_options(cfg: ModelConfig, **options) -> BlockOptions:
    """The block a family config describes: the fields every family shares (model/config.py), plus the
    family's own ``options``. The one place those fields become block options."""
    return BlockOptions(
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        head_dim=cfg.resolved_head_dim,
        d_ff=cfg.resolved_d_ff,
        activation=cfg.activation,
        norm_eps=cfg.norm_eps,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        init_std=cfg.init_std,
        dtype=cfg.dtype,
        attention_impl=cfg.attention_impl,
        num_experts=cfg.num_experts,
        moe_every=cfg.moe_every,
        moe_first=cfg.moe_first,
        expert_mlp=cfg.expert_mlp,
        experts_per_token=cfg.experts_per_token,
        expert_d_ff=cfg.resolved_expert_d_ff,
        shared_experts=cfg.shared_experts,
        router_renormalize=cfg.router_renormalize,
        router_jitter=cfg.router_jitter,
        moe_dispatch=cfg.moe_dispatch,
        capacity_factor=cfg.capacity_factor,
        moe_group_size=cfg.moe_group_size,
        expert_capacity=cfg.expert_capacity,
        moe_lb_weight=cfg.moe_lb_weight,
        moe_z_weight=cfg.moe_z_weight,
        **options,
    )


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
    """A float32 parameter annotated with its logical axis names. Placement is decided once, by the
    jitted state constructor's out_shardings (model/sharding.py), not eagerly per variable: models
    can then be built anywhere, with or without a mesh."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


class Buffer(nnx.Variable):
    """An array saved with the model but never trained (BART's ``final_logits_bias``): the optimizer
    only updates nnx.Param, checkpoints and Hugging Face export still carry it."""


def buffer(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> Buffer:
    return Buffer(jnp.zeros(shape, jnp.float32), out_sharding=axes, eager_sharding=False)


def lookup(table: nnx.Param, ids: Array, offset: int = 0) -> Array:
    """Rows of an embedding table; ``offset`` shifts learned positions (OPT, BART, RoBERTa keep the first
    rows of their tables for padding, so position p reads row p + 2).

    A table split along its model dimension (fsdp on embed) is gathered whole along it first, as every
    weight a matmul uses is, so each device takes its own rows' embeddings: XLA otherwise gathers every
    token of the global batch for each device's slice of D and takes the backward as a float32
    scatter-add of that size (GPT-3 175B, fsdp 128 x tensor 8: 0.8 GiB more temporaries per chip). An
    unsplit table is left alone: the constraint alone cost the tiny GPT on v5e:2x2 0.24 GiB."""
    table = table[...]
    if sharding.splits("embed", table.shape[1]):
        table = sharding.constrain(table, ("vocab", None))
    return jnp.take(table, ids + offset if offset else ids, axis=0)


class Bias(nnx.Module):
    """An additive bias of its own: an output layer's whose projection is a (tied) table elsewhere. Its
    parameter is named ``bias`` like every other bias, so the optimizer treats it as one (no decay)."""

    def __init__(self, dim: int, axes: tuple[str | None, ...], *, rngs: nnx.Rngs):
        self.bias = param(rngs, zeros, (dim,), axes)

    def __call__(self, x: Array) -> Array:
        return x + self.bias[...].astype(x.dtype)


class RelativePositionBias(nnx.Module):
    """T5's learned relative position bias: one scalar per (bucket of key - query offset, head), added
    to the attention logits of every layer (the table lives in the stack, not in a block)."""

    def __init__(self, num_heads: int, *, num_buckets: int, max_distance: int, bidirectional: bool, rngs):
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.table = param(rngs, normal(1.0), (num_buckets, num_heads), (None, "heads"))

    def __call__(self, L: int, S: int, q_offset: Array | int | None = None) -> Array:
        # By index in the row: within a packed segment index offsets equal position offsets, and the
        # segment mask hides every other key, so one (1, H, L, S) bias serves the whole batch. Query i
        # sits at index q_offset + i (default: the last L of S; a decoding cache passes its write index).
        q_offset = S - L if q_offset is None else q_offset
        relative_LS = jnp.arange(S)[None, :] - (jnp.arange(L)[:, None] + q_offset)
        buckets = t5_relative_buckets(
            relative_LS, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        bias_LSH = jnp.take(self.table[...], buckets, axis=0)
        return jnp.transpose(bias_LSH, (2, 0, 1))[None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm(x, scale, bias, eps: float, center: bool):
    """LayerNorm (``center``) or RMSNorm over the last axis, in float32, with a hand-written backward.

    Autodiff of the normalisation leaves XLA a chain of small ops per norm (two means, their broadcasts,
    the residual stream's gradient added in between) that it fuses into every consumer and re-evaluates
    there; this backward is the textbook one -- two row means and one elementwise pass:
    dx = r * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale. On the CPU benchmark shape it cut
    the layers' transposing copy-fusions from 102 to 39 ms per step (README, Performance); values agree
    with autodiff to float32 rounding (tests/test_gpt_model.py)."""
    return _norm_fwd(x, scale, bias, eps, center)[0]


def _norm_fwd(x, scale, bias, eps, center):
    xf = x.astype(jnp.float32)
    if center:
        xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    xhat = xf * r
    y = xhat * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), (xhat, r, scale, bias)


def _norm_bwd(eps, center, res, dy):
    xhat, r, scale, bias = res
    x_dtype = dy.dtype
    dy = dy.astype(jnp.float32)
    axes = tuple(range(dy.ndim - 1))
    d_scale = jnp.sum(dy * xhat, axis=axes).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(dy, axis=axes).astype(bias.dtype)
    g = dy * scale
    dx = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    if center:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    return (dx * r).astype(x_dtype), d_scale, d_bias


_norm.defvjp(_norm_fwd, _norm_bwd)


class Norm(nnx.Module):
    """LayerNorm (mean-centred, optional bias) or RMSNorm (T5 and LLaMA), computed in float32."""

    def __init__(
        self, dim: int, *, kind: str = "layernorm", eps: float = 1e-5, bias: bool = True, axes=("embed",), rngs
    ):
        self.kind, self.eps = kind, eps
        self.scale = param(rngs, ones, (dim,), axes)
        self.bias = param(rngs, zeros, (dim,), axes) if (bias and kind == "layernorm") else None

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...]
        return _norm(x, self.scale[...], bias, self.eps, self.kind == "layernorm")


class Dense(nnx.Module):
    """y = x @ W (+ b) over named input and output dims, e.g. D -> (H, K) for a query projection."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        in_axes: tuple[str | None, ...],
        out_axes: tuple[str | None, ...],
        *,
        use_bias: bool,
        init_std: float,
        rngs: nnx.Rngs,
    ):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, normal(init_std), in_shape + out_shape, in_axes + out_axes)
        self.bias = param(rngs, zeros, out_shape, out_axes) if use_bias else None

    def __call__(self, x: Array) -> Array:
        y = kernels.contract(x, self.kernel[...].astype(x.dtype), self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


unembed = kernels.unembed  # logits_BLV = x_BLD @ w_VD^T, XLA's or the host BLAS's (model/kernels.py)


def rotary(x_BLHK: Array, positions_BL: Array, rotary_dim: int, base: float, interleaved: bool) -> Array:
    """Rotary position embedding on the first ``rotary_dim`` dims of each head (RoFormer; GPT-J, NeoX)."""
    if rotary_dim == 0:
        return x_BLHK
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles_BLR = positions_BL[..., None].astype(jnp.float32) * inv_freq  # R = rotary_dim / 2
    sin, cos = jnp.sin(angles_BLR)[:, :, None, :], jnp.cos(angles_BLR)[:, :, None, :]
    rot, rest = x_BLHK[..., :rotary_dim].astype(jnp.float32), x_BLHK[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        x1, x2 = jnp.split(rot, 2, axis=-1)
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x_BLHK.dtype), rest], axis=-1)


class Attention(nnx.Module):
    """Multi-head, grouped-query or multi-query attention; self or cross; optional rotary."""

    def __init__(self, o: BlockOptions, *, rngs: nnx.Rngs):
        self.o = o
        D, H, G, K = o.d_model, o.num_heads, o.kv_heads, o.head_dim
        kw = dict(use_bias=o.qkv_bias, init_std=o.init_std, rngs=rngs)
        self.query = Dense((D,), (H, K), ("embed",), ("heads", "kv"), **kw)
        self.key = Dense((D,), (G, K), ("embed",), ("heads", "kv"), **kw)
        self.value = Dense((D,), (G, K), ("embed",), ("heads", "kv"), **kw)
        self.out = Dense(
            (H, K),
            (D,),
            ("heads", "kv"),
            ("embed",),
            use_bias=o.out_bias,
            init_std=o.out_init_std or o.init_std,
            rngs=rngs,
        )
        # Per-head query/key norms (Qwen3): one (K,) scale shared by every head, in float32 like every norm.
        qk = dict(kind="rmsnorm", eps=o.norm_eps, bias=False, axes=("kv",), rngs=rngs)
        self.q_norm = Norm(K, **qk) if o.qk_norm else None
        self.k_norm = Norm(K, **qk) if o.qk_norm else None

    def __call__(
        self,
        x_BLD: Array,
        *,
        mask_B1LS: Array | None,
        positions_BL: Array | None = None,
        kv_BSD: Array | None = None,
        kv_positions_BS: Array | None = None,
        bias_BHLS: Array | None = None,
        window: Array | None = None,
        rng: Array | None = None,
        cache: KVCache | None = None,
        layer: Array | int = 0,
        cross: bool = False,
    ) -> Array | tuple[Array, KVCache]:
        """The attention output; with a decoding ``cache``, (output, cache): the new keys/values are
        written into this ``layer``'s slots and the queries attend over every slot (``mask_B1LS`` is
        then (B, 1, L, M)). Cached cross-attention (``cross``) projects ``kv_BSD`` once, at prefill;
        later steps pass kv_BSD=None and read the stored keys/values."""
        o = self.o
        fused = kv_BSD is None and not cross and o.kv_heads == o.num_heads
        q, k, v = self._fused_qkv(x_BLD) if fused else (self.query(x_BLD), None, None)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if o.rotary_dim:
            q = rotary(q, positions_BL, o.rotary_dim, o.rotary_base, o.rotary_interleaved)
        if cache is not None and cross and kv_BSD is None:
            k, v = cache.read(layer, cross=True)
        else:
            kv_BSD = x_BLD if kv_BSD is None else kv_BSD
            if not fused:
                k, v = self.key(kv_BSD), self.value(kv_BSD)
            if self.k_norm is not None:
                k = self.k_norm(k)
            if o.rotary_dim:
                kv_positions_BS = positions_BL if kv_positions_BS is None else kv_positions_BS
                k = rotary(k, kv_positions_BS, o.rotary_dim, o.rotary_base, o.rotary_interleaved)
            if cache is not None:
                cache = cache.write(layer, k, v, cross=cross)
                k, v = cache.read(layer, cross=cross)
        if window is not None:  # local attention (a per-layer input: 0 for global layers)
            q_offset = None if cache is None else cache.index
            local = local_window_mask(x_BLD.shape[1], k.shape[1], window, q_offset)
            mask_B1LS = local if mask_B1LS is None else local & dense_mask(mask_B1LS)
        scale = o.attn_scale or 1.0 / math.sqrt(o.head_dim)
        out = attention(
            q,
            k,
            v,
            mask_B1LS=mask_B1LS,
            bias_BHLS=bias_BHLS,
            scale=scale,
            # The Pallas kernel tiles queries in blocks of 128; a decoding step has one.
            impl="xla" if cache is not None and o.attention_impl == "flash" else o.attention_impl,
            dropout_rate=o.attention_dropout,
            rng=rng,
        )
        out = self.out(out)
        return out if cache is None else (out, cache)

    def _fused_qkv(self, x_BLD: Array) -> tuple[Array, Array, Array]:
        """Self-attention's queries, keys and values from one matmul against the three kernels stacked on
        a new axis, (D, 3, H, K): one (D x 3HK) GEMM forward and two backward instead of three small ones
        each (the stacked axis is unsharded, so the kernels' shardings carry over unchanged). The
        parameters stay three Dense layers (checkpoints, Hugging Face mappings)."""
        dense = (self.query, self.key, self.value)
        w = jnp.stack([d.kernel[...] for d in dense], axis=1).astype(x_BLD.dtype)
        y_BLTHK = kernels.contract(x_BLD, w, 1)
        if self.o.qkv_bias:
            y_BLTHK = y_BLTHK + jnp.stack([d.bias[...] for d in dense]).astype(x_BLD.dtype)
        return y_BLTHK[:, :, 0], y_BLTHK[:, :, 1], y_BLTHK[:, :, 2]


class MLP(nnx.Module):
    """Position-wise feed-forward: plain (GPT-2, BERT, T5 v1.0) or gated (T5 v1.1, LLaMA, PaLM)."""

    def __init__(self, o: BlockOptions, *, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[o.activation]
        kw = dict(use_bias=o.mlp_bias, init_std=o.init_std, rngs=rngs)
        self.wi = Dense((o.d_model,), (o.d_ff,), ("embed",), ("mlp",), **kw)
        self.wg = Dense((o.d_model,), (o.d_ff,), ("embed",), ("mlp",), **kw) if o.gated_mlp else None
        self.wo = Dense(
            (o.d_ff,),
            (o.d_model,),
            ("mlp",),
            ("embed",),
            use_bias=o.mlp_bias,
            init_std=o.out_init_std or o.init_std,
            rngs=rngs,
        )

    def __call__(self, x_BLD: Array) -> Array:
        if self.wg is not None:
            h_BLF = self.act(self.wg(x_BLD)) * self.wi(x_BLD)
        else:
            h_BLF = self.act(self.wi(x_BLD))
        return self.wo(h_BLF)


class Experts(nnx.Module):
    """E expert MLPs stacked on a leading 'expert' axis (sharded over the expert mesh axis)."""

    def __init__(self, o: BlockOptions, *, rngs: nnx.Rngs):
        E, D, F = o.num_experts, o.d_model, o.expert_d_ff
        self.num_experts, self.act = E, ACTIVATIONS[o.activation]
        std, out_std = o.init_std, o.out_init_std or o.init_std
        # 'expert_embed': the model dimension of an expert kernel, over fsdp only (dense weights' 'embed' is
        # over fsdp and expert, and a mesh axis shards one dimension of an array at most)
        self.wi = param(rngs, normal(std), (E, D, F), ("expert", "expert_embed", "mlp"))
        wg = param(rngs, normal(std), (E, D, F), ("expert", "expert_embed", "mlp")) if o.gated_experts else None
        self.wg = wg
        self.wo = param(rngs, normal(out_std), (E, F, D), ("expert", "mlp", "expert_embed"))

    def _hidden(self, x, matmul):
        h = matmul(x, self.wi[...].astype(x.dtype))
        if self.wg is not None:
            return self.act(matmul(x, self.wg[...].astype(x.dtype))) * h
        return self.act(h)

    def __call__(self, x_ECD: Array) -> Array:
        """Each expert on its (C, D) buffer of tokens."""
        h_ECF = self._hidden(x_ECD, lambda x, w: jnp.einsum("ECD,EDF->ECF", x, w))
        return jnp.einsum("ECF,EFD->ECD", h_ECF, self.wo[...].astype(h_ECF.dtype))

    def grouped(self, x_AD: Array, sizes_E: Array) -> Array:
        """Rows sorted by expert, sizes_E rows each: one grouped matmul per weight."""
        h_AF = self._hidden(x_AD, lambda x, w: jax.lax.ragged_dot(x, w, sizes_E))
        return jax.lax.ragged_dot(h_AF, self.wo[...].astype(h_AF.dtype), sizes_E)


class MoE(nnx.Module):
    """A sparse feed-forward layer: a float32 router, top-k experts (model/moe.py), optional shared experts.
    Sows its statistics (moe.STATS) as ``moe_stats``; the stack gathers them (BlockStack)."""

    def __init__(self, o: BlockOptions, *, rngs: nnx.Rngs):
        self.o = o
        self.router = param(rngs, normal(o.init_std), (o.d_model, o.num_experts), ("embed", None))
        self.experts = Experts(o, rngs=rngs)
        width = o.shared_experts * o.expert_d_ff
        self.shared = MLP(dataclasses.replace(o, d_ff=width, mlp_bias=False), rngs=rngs) if width else None

    def __call__(self, x_BLD: Array, *, rng: Array | None = None, dropless: bool = False) -> Array:
        o = self.o
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        r_TD = x_TD.astype(jnp.float32)
        if rng is not None and o.router_jitter:
            r_TD = r_TD * jax.random.uniform(rng, r_TD.shape, jnp.float32, 1 - o.router_jitter, 1 + o.router_jitter)
        logits_TE = r_TD @ self.router[...]
        weights_TK, experts_TK, probs_TE = moe.route(logits_TE, o.experts_per_token, o.router_renormalize)
        if dropless or o.moe_dispatch == "dropless":
            y_TD, kept_TK = moe.dispatch_dropless(x_TD, weights_TK, experts_TK, self.experts)
        else:
            S = moe.group_size(o.moe_group_size, B, L)
            G, K = B * L // S, o.experts_per_token
            cap = o.expert_capacity or moe.capacity(S, K, o.num_experts, o.capacity_factor)
            y_GSD, kept_GSK = moe.dispatch_capacity(
                x_TD.reshape(G, S, D),
                weights_TK.reshape(G, S, K),
                experts_TK.reshape(G, S, K),
                self.experts,
                cap,
                sharding.constrain,
            )
            y_TD, kept_TK = y_GSD.reshape(B * L, D), kept_GSK.reshape(B * L, K)
        stats = moe.aux_stats(logits_TE, probs_TE, experts_TK, kept_TK)
        stats["moe_aux_loss"] = o.moe_lb_weight * stats["moe_lb_loss"] + o.moe_z_weight * stats["moe_z_loss"]
        moe.record(self, stats)
        y_BLD = y_TD.reshape(B, L, D).astype(x_BLD.dtype)
        return y_BLD if self.shared is None else y_BLD + self.shared(x_BLD)


class Block(nnx.Module):
    """One transformer layer. Norm position, parallel residual and cross-attention are options; ``sparse``
    makes its feed-forward layer a mixture of experts (MoE)."""

    def __init__(self, o: BlockOptions, *, rngs: nnx.Rngs, sparse: bool = False):
        self.o = o
        norm = dict(kind=o.norm, eps=o.norm_eps, bias=o.norm_bias, rngs=rngs)
        self.attn_norm = Norm(o.d_model, **norm)
        self.attn = Attention(o, rngs=rngs)
        if o.cross_attention:
            self.cross_norm = Norm(o.d_model, **norm)
            self.cross = Attention(dataclasses.replace(o, rotary_dim=0), rngs=rngs)
        self.mlp_norm = None if (o.parallel_block and o.shared_parallel_norm) else Norm(o.d_model, **norm)
        self.mlp = MoE(o, rngs=rngs) if sparse else MLP(o, rngs=rngs)

    def __call__(
        self,
        x_BLD: Array,
        *,
        mask_B1LS: Array | None,
        positions_BL: Array | None = None,
        bias_BHLS: Array | None = None,
        encoded_BSD: Array | None = None,
        cross_mask_B1LS: Array | None = None,
        cross_bias_BHLS: Array | None = None,
        window: Array | None = None,
        rng: Array | None = None,
        cache: KVCache | None = None,
        layer: Array | int = 0,
    ) -> Array | tuple[Array, KVCache]:
        """The block's output; with a decoding ``cache`` (see Attention), (output, cache)."""
        o = self.o
        rngs = list(jax.random.split(rng, 6)) if rng is not None else [None] * 6
        caches = [cache]  # threaded through the attention calls below
        mlp = self.mlp
        if isinstance(mlp, MoE):  # router jitter's key; decoding never drops a token
            mlp = functools.partial(self.mlp, rng=rngs[5], dropless=cache is not None)

        def cached(attn, h, cross=False, **kw):
            if cache is None:
                return attn(h, **kw)
            out, caches[0] = attn(h, cache=caches[0], layer=layer, cross=cross, **kw)
            return out

        def self_attn(h):
            return cached(
                self.attn,
                h,
                mask_B1LS=mask_B1LS,
                positions_BL=positions_BL,
                bias_BHLS=bias_BHLS,
                window=window,
                rng=rngs[0],
            )

        def cross_attn(h):
            kw = dict(mask_B1LS=cross_mask_B1LS, kv_BSD=encoded_BSD, bias_BHLS=cross_bias_BHLS, rng=rngs[1])
            return cached(self.cross, h, cross=True, **kw)

        def result(x):
            x = sharding.constrain(x, ("batch", "length", "activation_embed"))
            return x if cache is None else (x, caches[0])

        if o.parallel_block:
            h = self.attn_norm(x_BLD)
            h_mlp = h if self.mlp_norm is None else self.mlp_norm(x_BLD)
            y = dropout(self_attn(h), o.dropout, rngs[2]) + dropout(mlp(h_mlp), o.dropout, rngs[3])
            return result(x_BLD + y)

        sublayers = [(self.attn_norm, self_attn)]
        if o.cross_attention:
            sublayers.append((self.cross_norm, cross_attn))
        sublayers.append((self.mlp_norm, mlp))
        for i, (norm, fn) in enumerate(sublayers):
            if o.norm_position == "pre":
                x_BLD = x_BLD + dropout(fn(norm(x_BLD)), o.dropout, rngs[2 + i])
            else:  # post-LN (original Transformer, BERT, BART)
                x_BLD = norm(x_BLD + dropout(fn(x_BLD), o.dropout, rngs[2 + i]))
        return result(x_BLD)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots_and_offload": None,  # resolved in _remat_policy: needs platform support
}


def _remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(REMAT_POLICIES)}")
    if name == "save_dots_and_offload":
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return REMAT_POLICIES[name]


def _pipeline_policy(name: str):
    """A remat policy for one pipeline iteration (model/pipeline.py): each layer's input, plus what ``name``
    saves of a layer ('none': every matmul output; elementwise work is recomputed); never the weights."""
    inputs = jax.checkpoint_policies.save_only_these_names(pipeline.LAYER_INPUT)
    inner = jax.checkpoint_policies.dots_saveable if name == "none" else _remat_policy(name)
    return inputs if inner is None else jax.checkpoint_policies.save_from_both_policies(inputs, inner)


class BlockGroup(nnx.Module):
    """``period`` consecutive blocks of a stack whose layers differ with a period (moe_every: dense, ...,
    sparse): the unit a scanned stack repeats. Called like a block, for layers ``layer`` .. + period - 1."""

    def __init__(self, blocks: list[nnx.Module]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x, *, rng=None, cache=None, layer=0, **kwargs):
        per_layer = kwargs.pop("per_layer_group", {})
        rngs = jax.random.split(rng, len(self.blocks)) if rng is not None else [None] * len(self.blocks)
        for j, block in enumerate(self.blocks):
            kw = {k: v[j] for k, v in per_layer.items()}
            extra = {} if cache is None else dict(cache=cache, layer=layer * len(self.blocks) + j)
            out = block(x, rng=rngs[j], **kwargs, **kw, **extra)
            x, cache = (out, cache) if cache is None else out
        return x if cache is None else (x, cache)


def stack(o: BlockOptions, num_layers: int, *, scan: bool, remat: str, rngs: nnx.Rngs) -> BlockStack:
    """A family's stack of blocks: dense, or every ``o.moe_every``-th layer sparse (the last of each period:
    layers 1, 3, 5, ... for moe_every=2, as Switch Transformers; with moe_first the first: 0, 2, 4, ..., as
    GShard and GLaM)."""
    period = o.moe_every if o.num_experts else 1
    sparse_j = 0 if o.moe_first else period - 1
    return BlockStack(
        lambda r, j: Block(o, sparse=o.num_experts > 0 and j == sparse_j, rngs=r),
        num_layers,
        scan=scan,
        remat=remat,
        period=period,
        rngs=rngs,
    )


class BlockStack(nnx.Module):
    """N blocks, either stacked on a leading 'layers' axis and run with a scan (compile time independent of
    depth), or kept as a list and unrolled. Per-layer inputs (such as a per-layer attention window) can be
    passed as arrays with a leading N axis in ``per_layer``. Layers may differ with a ``period``: layer i is
    ``make_block(rngs, i % period)``; a scan then repeats BlockGroups of ``period`` blocks.

    Mixture-of-experts layers sow their statistics; the stack pops them from each layer's call (they leave
    a scan as its outputs), sums them and sows the sum as its own ``moe_stats`` (moe.collect reads it)."""

    def __init__(
        self,
        make_block: Callable[[nnx.Rngs, int], nnx.Module],
        num_layers: int,
        *,
        scan: bool,
        remat: str = "none",
        period: int = 1,
        rngs: nnx.Rngs,
    ):
        self.num_layers, self.scan, self.remat, self.period = num_layers, scan, remat, period
        _remat_policy(remat)  # validate early
        if num_layers % period:
            raise ValueError(f"{num_layers} layers are no whole number of periods of {period}")

        def unit(r, i=0):
            if period == 1:
                return make_block(r, 0)
            if not scan:
                return make_block(r, i % period)
            return BlockGroup([make_block(r, j) for j in range(period)])

        if scan:

            @nnx.split_rngs(splits=num_layers // period)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stacked(r):
                return unit(r)

            self.layers = make_stacked(rngs)
        else:
            self.layers = nnx.List([unit(rngs, i) for i in range(num_layers)])

    def __call__(
        self,
        x: Array,
        *,
        rng: Array | None = None,
        per_layer: dict | None = None,
        cache: KVCache | None = None,
        **kwargs,
    ) -> Array | tuple[Array, KVCache]:
        """The stack's output; with a decoding ``cache``, (output, cache). The cache rides in the scan's
        carry, not its inputs/outputs, so each layer's write is an in-place update of the one buffer."""
        per_layer = per_layer or {}
        policy = _remat_policy(self.remat)
        grouped = self.scan and self.period > 1
        units = self.num_layers // self.period if grouped else self.num_layers
        rngs = jax.random.split(rng, units) if rng is not None else None
        if grouped:
            per_layer = {k: v.reshape((units, self.period) + v.shape[1:]) for k, v in per_layer.items()}

        def make_apply(graphdef):
            def apply(layer_params, x, layer_rng, layer_kwargs, cache, layer):
                extra = {} if cache is None else dict(cache=cache, layer=layer)
                if grouped:
                    layer_kwargs = {"per_layer_group": layer_kwargs}
                    extra = dict(cache=cache, layer=layer) if cache is not None else dict(layer=layer)
                module = nnx.merge(graphdef, layer_params)
                out = module(x, rng=layer_rng, **kwargs, **layer_kwargs, **extra)
                out = (out, None) if cache is None else out
                return out, moe.block_stats(module)

            return apply if self.remat == "none" else jax.checkpoint(apply, policy=policy)

        schedule = pipeline.current()
        if schedule is not None and self.scan and cache is None:
            # Pipeline stages (model/pipeline.py): checked at the config boundary (Schedule.check); dense stacks.
            graphdef, params = nnx.split(self.layers)

            def layer(layer_params, h, layer_rng, layer_kwargs, batch_kwargs):
                return nnx.merge(graphdef, layer_params)(h, rng=layer_rng, **batch_kwargs, **layer_kwargs)

            # Per layer as without stages: the iteration's own checkpoint (pipeline.run) replays a stage's
            # forward for its backward pass, and this one keeps that replay to one layer's activations at a time.
            if self.remat != "none":
                layer = jax.checkpoint(layer, policy=policy)
            return pipeline.run(
                layer,
                params,
                x,
                schedule,
                rngs=rngs,
                per_layer=per_layer,
                batch_kwargs=kwargs,
                policy=_pipeline_policy(self.remat),
            )

        stats = None
        if not self.scan:
            for i, block in enumerate(self.layers):
                graphdef, layer_params = nnx.split(block)
                layer_rng = None if rngs is None else rngs[i]
                layer_kwargs = {k: v[i] for k, v in per_layer.items()}
                (x, cache), s = make_apply(graphdef)(layer_params, x, layer_rng, layer_kwargs, cache, i)
                stats = moe.add_stats(stats, s)
        else:
            graphdef, params = nnx.split(self.layers)
            apply = make_apply(graphdef)

            def body(carry, xs):
                layer_params, layer_rng, layer_kwargs, layer = xs
                out, s = apply(layer_params, *carry[:1], layer_rng, layer_kwargs, *carry[1:], layer)
                return out, s

            layer_ids = jnp.arange(units, dtype=jnp.int32)
            (x, cache), ys = jax.lax.scan(body, (x, cache), (params, rngs, per_layer, layer_ids))
            stats = None if ys is None else jax.tree.map(lambda a: jnp.sum(a, axis=0), ys)
        if stats is not None:
            moe.record(self, stats)
        return x if cache is None else (x, cache)
