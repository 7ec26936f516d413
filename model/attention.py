"""Attention kernels behind one switch, and the masks they take.

Every attention in podformer goes through ``attention``; ``impl`` picks the kernel ('xla' by default).
Masks are boolean (B, 1, L, S): True where a query may attend to a key. Additive biases (T5's
relative positions, ALiBi) are (B or 1, H, L, S) float arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd
from jax.sharding import PartitionSpec

from podformer.core import sharding
from podformer.core.errors import UserError
from podformer.model import host_blas, kernels

Array = jax.Array


def dropout(x: Array, rate: float, rng: Array | None) -> Array:
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def make_attention_mask(
    q_segment_ids_BL: Array,
    kv_segment_ids_BS: Array,
    *,
    causal: bool,
    q_positions_BL: Array | None = None,
    kv_positions_BS: Array | None = None,
) -> Array:
    """Boolean (B, 1, L, S) mask: same segment, and for causal attention key index <= query index.

    Segment id 0 marks padding. Padding queries may only see padding keys, so no softmax row is ever
    empty (an all-masked row would give NaNs or a uniform average of garbage).
    """
    mask = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
    if causal:
        # Causality is by index in the packed row, not by position id: positions restart per segment.
        L, S = q_segment_ids_BL.shape[1], kv_segment_ids_BS.shape[1]
        mask &= (jnp.arange(L)[:, None] + (S - L)) >= jnp.arange(S)[None, :]
    return mask[:, None, :, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentMask:
    """``make_attention_mask`` kept as its segment ids: what the flash kernel takes (its own causal and
    segment masking, block by block), so no (B, 1, L, S) mask nor (B, H, L, S) bias is ever built for it.
    Every other kernel gets ``dense()``."""

    q_segment_ids_BL: Array
    kv_segment_ids_BS: Array
    causal: bool = dataclasses.field(metadata=dict(static=True))

    def dense(self) -> Array:
        return make_attention_mask(self.q_segment_ids_BL, self.kv_segment_ids_BS, causal=self.causal)


def dense_mask(mask):
    """A (B, 1, L, S) boolean mask (or None) from a mask or a ``SegmentMask``."""
    return mask.dense() if isinstance(mask, SegmentMask) else mask


def local_window_mask(L: int, S: int, window: Array | int, q_offset: Array | int | None = None) -> Array:
    """(1, 1, L, S): key within the last ``window`` indices of the query (GPT-Neo's local layers), by index
    in the row like the causal mask. ``window`` may be traced (a per-layer input of a scanned stack);
    0 means unlimited (a global layer). Query i sits at index ``q_offset + i`` (default S - L: the last
    L keys; a decoding cache passes its write index)."""
    q_offset = S - L if q_offset is None else q_offset
    distance = (jnp.arange(L)[:, None] + q_offset) - jnp.arange(S)[None, :]
    return ((window <= 0) | (distance < window))[None, None]


def alibi_slopes(num_heads: int) -> Array:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence from 2^(-8/n); for a head count
    that is not a power of two, the odd entries of the next power's sequence fill the rest (BLOOM)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra**i for i in range(1, 2 * min(closest, num_heads - closest), 2)]
    return jnp.asarray(slopes, jnp.float32)


def alibi_bias(num_heads: int, kv_positions_BS: Array) -> Array:
    """(B, H, 1, S) additive ALiBi bias. It depends on the key position only: ``-slope * (q - k)`` and
    ``slope * k`` differ by a per-row constant, which softmax ignores (BLOOM's formulation)."""
    return alibi_slopes(num_heads)[None, :, None, None] * kv_positions_BS[:, None, None, :].astype(jnp.float32)


def t5_relative_buckets(relative_BLS: Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Array:
    """T5's bucketing of ``key - query`` offsets: exact buckets for small offsets, logarithmic ones up
    to ``max_distance``; bidirectional attention spends half the buckets on each direction."""
    buckets = jnp.zeros_like(relative_BLS)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_BLS > 0).astype(relative_BLS.dtype) * num_buckets
        n = jnp.abs(relative_BLS)
    else:
        n = -jnp.minimum(relative_BLS, 0)
    max_exact = num_buckets // 2
    # float32 log, then truncation toward zero, exactly as the reference computes it.
    large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(relative_BLS.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(n < max_exact, n, large)


def _attention_reference(q, k, v, mask, bias, scale, dropout_rate, rng, *, return_weights: bool = False):
    """Plain einsum attention with float32 softmax; the only path that supports attention dropout.
    ``return_weights``: (output, the softmax weights (B, H, L, S) float32, before dropout)."""
    B, L, H, K = q.shape
    G = k.shape[2]
    q = q.reshape(B, L, G, H // G, K)
    logits = jnp.einsum("BLGRK,BSGK->BGRLS", q, k).astype(jnp.float32) * scale
    logits = logits.reshape(B, H, L, -1)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    probs = dropout(weights, dropout_rate, rng).astype(v.dtype)
    out = jnp.einsum("BGRLS,BSGK->BLGRK", probs.reshape(B, G, H // G, L, -1), v).reshape(B, L, H, K)
    return (out, weights) if return_weights else out


def _attention_jax(implementation):
    def fn(q, k, v, mask, bias, scale, dropout_rate, rng):
        if dropout_rate > 0.0 and rng is not None:
            return _attention_reference(q, k, v, mask, bias, scale, dropout_rate, rng)
        return _dot_product_attention(q, k, v, mask, bias, scale, implementation)

    return fn


def _bmm(a, b, **kw):
    """(B, H, ...) batched matmul on the host BLAS, the batch dims flattened."""
    out = host_blas.matmul(a.reshape((-1,) + a.shape[2:]), b.reshape((-1,) + b.shape[2:]), **kw)
    return out.reshape(a.shape[:2] + out.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _host_attention(q_BHLK, k_BHSK, v_BHSK, mask_B1LS, scale):
    """float32 attention on a CPU, its batched matmuls on the host BLAS (model/host_blas.py), with
    the flash-attention backward: dS = P * (dP - rowsum(dO * O)), a reduction over the head dim
    instead of autodiff's over the keys."""
    return _host_attention_fwd(q_BHLK, k_BHSK, v_BHSK, mask_B1LS, scale)[0]


def _host_attention_fwd(q_BHLK, k_BHSK, v_BHSK, mask_B1LS, scale):
    logits = _bmm(q_BHLK, k_BHSK, transpose_b=True) * scale
    if mask_B1LS is not None:
        logits = jnp.where(mask_B1LS, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = _bmm(probs, v_BHSK)
    return out, (q_BHLK, k_BHSK, v_BHSK, probs, out, mask_B1LS)


def _host_attention_bwd(scale, res, d_out):
    q, k, v, probs, out, mask = res
    d_v = _bmm(probs, d_out, transpose_a=True)
    d_probs = _bmm(d_out, v, transpose_b=True)
    d_logits = probs * (d_probs - jnp.sum(d_out * out, axis=-1, keepdims=True)) * scale
    d_q = _bmm(d_logits, k)
    d_k = _bmm(d_logits, q, transpose_a=True)
    return d_q, d_k, d_v, None


_host_attention.defvjp(_host_attention_fwd, _host_attention_bwd)


def _dot_product_attention_host(q, k, v, mask, bias, scale, implementation):
    qh, kh, vh = _heads_first(q, k, v)
    return jnp.swapaxes(_host_attention(qh, kh, vh, mask, scale), 1, 2)


@kernels.dispatch(host=_dot_product_attention_host, supports=lambda q, k, v, mask, bias, *_: bias is None)
def _dot_product_attention(q, k, v, mask, bias, scale, implementation):
    """Attention without dropout: XLA's (jax.nn.dot_product_attention), or on the host BLAS
    (model/kernels.py) where there is no additive bias."""
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation=implementation)


def _refuse(impl: str, why: str):
    raise UserError(f"model.attention_impl={impl!r} {why}")


# Where the Pallas TPU kernels may run: on TPUs, in the TPU compiler's AOT mode (podformer/aot.py), or
# emulated by Pallas' interpreter (tests on CPU; exact but far too slow to train with).
_pallas = {"interpret": False, "target": None}


@contextlib.contextmanager
def pallas_mode(*, interpret: bool = False, target: str | None = None):
    """``interpret=True``: run the TPU kernels in Pallas' interpreter; ``target='tpu'``: trace them for
    a TPU (ahead-of-time compilation on a host without one)."""
    saved = dict(_pallas)
    _pallas.update(interpret=interpret, target=target)
    try:
        if interpret:  # must cover the lowering too (jit lowers after tracing): the whole block
            from jax.experimental.pallas import tpu as pltpu

            # `True`, not an InterpretParams: Pallas' HLO interpreter, which lowers the kernel's body to
            # plain XLA ops (a loop over the grid). The TPU simulator (InterpretParams) runs every kernel
            # as Python io_callbacks on XLA:CPU's device threads, in lockstep through barriers across all
            # devices: under a mesh of 8 fake devices a train step deadlocked there (every device thread
            # waiting for the GIL inside the simulator's callbacks while the main thread blocked on the
            # step's result; no CPU used), and a callback per kernel op is far too slow for a loss test.
            with pltpu.force_tpu_interpret_mode(True):
                yield
        else:
            yield
    finally:
        _pallas.update(saved)


def _pallas_checks(impl, q, k, dropout_rate, rng):
    platform = _pallas["target"] or jax.devices()[0].platform
    if platform != "tpu" and not _pallas["interpret"]:
        _refuse(impl, f"is a Pallas TPU kernel and this run is on {platform}: use 'xla' (or 'cudnn' on GPUs)")
    if q.shape[1] % 128 or k.shape[1] % 128:
        _refuse(impl, f"tiles sequences in multiples of 128 (got {q.shape[1]} and {k.shape[1]}): use 'xla'")
    if dropout_rate > 0.0 and rng is not None:
        _refuse(impl, "has no attention dropout: set model.attention_dropout=0 or use 'xla'")


def _heads_first(q, k, v):
    """(B, L, H, K) -> (B, H, L, K), with grouped key/value heads repeated up to H (the kernels below
    take equal head counts)."""
    H, G = q.shape[2], k.shape[2]
    k, v = (jnp.repeat(t, H // G, axis=2) if G != H else t for t in (k, v))
    return (jnp.swapaxes(t, 1, 2) for t in (q, k, v))


def _block(n: int, preferred: int) -> int:
    return preferred if n % preferred == 0 else 128  # n is a multiple of 128 (checked)


def _attention_flash(q, k, v, mask, bias, scale, dropout_rate, rng):
    """Pallas TPU flash attention (jax.experimental.pallas.ops.tpu.flash_attention; Splash attention for
    segment ids without a bias, below). Every mask and bias is exact: the boolean mask and any additive
    bias (T5 relative, ALiBi) go in as one additive (B, H, L, S) bias the kernel streams block by block.
    That costs O(L*S) memory traffic; the softmax itself is never materialised."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    _pallas_checks("flash", q, k, dropout_rate, rng)
    B, L, H, _ = q.shape
    S = k.shape[1]
    segments = None
    if isinstance(mask, SegmentMask) and (not mask.causal or L == S):
        # The kernel's causal mask is by index with queries and keys aligned (L == S), as ours is then.
        segments, causal, mask = mask, mask.causal, None
    mask = dense_mask(mask)
    ab = None
    if mask is not None or bias is not None:
        ab = jnp.zeros((1, 1, 1, 1), jnp.float32)
        if bias is not None:
            ab = ab + bias.astype(jnp.float32)
        if mask is not None:  # the kernel's own mask value: finite, so no inf - inf in the backward pass
            ab = jnp.where(mask, ab, fa.DEFAULT_MASK_VALUE)
        ab = jnp.broadcast_to(ab, (B, H, L, S))
    bq, bk = _block(L, 128), _block(S, 128)
    sizes = fa.BlockSizes(
        block_q=bq,
        block_k_major=bk,
        block_k=bk,
        block_b=1,
        block_q_major_dkv=bq,
        block_k_major_dkv=bk,
        block_k_dkv=bk,
        block_q_dkv=bq,
        block_k_major_dq=bk,
        block_k_dq=bk,
        block_q_dq=bq,
    )
    qh, kh, vh = _heads_first(q * jnp.asarray(scale, q.dtype), k, v)
    # The kernel scales (q k^T + ab); the bias must not be scaled, so q is scaled beforehand.
    if segments is not None:
        # Segment ids and causality, no bias: Splash attention (as MaxText runs it), whose backward keeps
        # the row log-sum-exp as (H, L) float32; the flash kernel keeps its row max and sum broadcast to
        # 128 lanes, (B, H, L, 128) float32 each (LLaMA-2 70B on v5p-512: 0.5 GiB each per layer).
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

        def kernel(q, k, v, q_ids, kv_ids):
            heads = [sm.CausalMask((L, S)) if causal else sm.FullMask((L, S)) for _ in range(q.shape[1])]
            mask = sm.MultiHeadMask(heads)
            splash = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=splash_sizes)

            def row(q, k, v, q_ids, kv_ids):  # one row of the batch: (H, L, K)
                return splash(q, k, v, segment_ids=sk.SegmentIds(q_ids, kv_ids))

            return jax.vmap(row)(q, k, v, q_ids, kv_ids)

        splash_sizes = sk.BlockSizes(
            block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
            block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk,
        )  # fmt: skip
        args = (qh, kh, vh, segments.q_segment_ids_BL, segments.kv_segment_ids_BS)
    else:

        def kernel(q, k, v, ab=None):
            return fa.flash_attention(q, k, v, ab=ab, sm_scale=1.0, block_sizes=sizes)

        args = (qh, kh, vh) if ab is None else (qh, kh, vh, ab)
    return jnp.swapaxes(_per_shard(kernel, args, B, H), 1, 2)


def _per_shard(kernel, args: tuple, B: int, H: int):
    """``kernel`` over (B, H, ...) arrays under the active mesh: a Mosaic kernel cannot be partitioned by
    XLA, so it runs in a shard_map, each device on its own rows (the rules' batch axes) and heads (their
    heads axes), as MaxText runs Splash. Attention is independent per row and head: no collectives."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    rules = flax_spmd.get_logical_axis_rules() or ()
    shape = dict(mesh.shape)
    dims = sharding.logical_to_spec(("batch", "heads"), rules, (B, H), shape) if rules else PartitionSpec(None, None)
    spec = PartitionSpec(dims[0], dims[1], None, None)
    # Segment ids (B, L) and (B, S) go with their rows.
    specs = jax.tree.map(lambda a: spec if a.ndim == 4 else PartitionSpec(dims[0], None), args)
    return jax.shard_map(kernel, in_specs=specs, out_specs=spec, check_vma=False)(*args)


def _attention_cudnn(q, k, v, mask, bias, scale, dropout_rate, rng):
    """cuDNN fused attention (jax.nn.dot_product_attention(implementation='cudnn')): NVIDIA GPUs,
    bfloat16/float16. The boolean mask and bias are folded into one additive bias by JAX."""
    platform = jax.devices()[0].platform
    if platform != "gpu":
        _refuse("cudnn", f"needs an NVIDIA GPU (cuDNN fused attention) and this run is on {platform}: use 'xla'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        _refuse("cudnn", f"needs bfloat16 or float16 compute, not {q.dtype}: set model.dtype=bfloat16")
    if dropout_rate > 0.0 and rng is not None:
        _refuse("cudnn", "has no attention dropout here: set model.attention_dropout=0 or use 'xla'")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")


def resolve_auto(q, k, dropout_rate: float, rng) -> tuple[str, str]:
    """What ``attention_impl='auto'`` runs for these operands, and why: the fused kernel of the platform
    (Pallas flash on TPUs, cuDNN on NVIDIA GPUs) where it supports the call, else XLA's."""
    platform = _pallas["target"] or jax.devices()[0].platform
    dropout = dropout_rate > 0.0 and rng is not None
    if platform == "tpu" or _pallas["interpret"]:
        if q.shape[1] % 128 or k.shape[1] % 128:
            return "xla", f"flash tiles sequences in multiples of 128 (got {q.shape[1]} and {k.shape[1]})"
        return ("xla", "flash has no attention dropout") if dropout else ("flash", "Pallas flash on TPU")
    if platform == "gpu":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return "xla", f"cuDNN needs bfloat16 or float16 compute, not {q.dtype}"
        return ("xla", "cuDNN has no attention dropout here") if dropout else ("cudnn", "cuDNN on NVIDIA GPUs")
    return "xla", f"no fused attention kernel on {platform}"


_said: set[str] = set()


def _resolve_and_say(q, k, dropout_rate: float, rng) -> str:
    """``resolve_auto``'s kernel; a fallback to XLA's is logged once per reason (at trace time)."""
    impl, why = resolve_auto(q, k, dropout_rate, rng)
    if impl == "xla" and why not in _said:
        _said.add(why)
        logging.getLogger("podformer").info("model.attention_impl=auto: XLA attention (%s)", why)
    return impl


def _attention_auto(q, k, v, mask, bias, scale, dropout_rate, rng):
    impl = _resolve_and_say(q, k, dropout_rate, rng)
    return ATTENTION_IMPLS[impl](q, k, v, mask, bias, scale, dropout_rate, rng)


# One switch for the attention kernel; every call in podformer goes through `attention` below.
ATTENTION_IMPLS = {
    "auto": _attention_auto,
    "xla": _attention_jax("xla"),
    "cudnn": _attention_cudnn,
    # Pallas flash; with a SegmentMask and no bias (GPT's packed causal rows) it runs Splash attention,
    # whose static causal mask and segment ids are exactly that mask.
    "flash": _attention_flash,
    "reference": _attention_reference,
}


def attention(
    q_BLHK: Array,
    k_BSGK: Array,
    v_BSGK: Array,
    *,
    mask_B1LS: Array | None,
    bias_BHLS: Array | None = None,
    scale: float,
    impl: str = "xla",
    dropout_rate: float = 0.0,
    rng: Array | None = None,
) -> Array:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {sorted(ATTENTION_IMPLS)}")
    if impl == "auto":
        impl = _resolve_and_say(q_BLHK, k_BSGK, dropout_rate, rng)
    if impl != "flash":
        mask_B1LS = dense_mask(mask_B1LS)
    if _recording is not None:  # the reference path computes both what the model uses and the weights
        out, weights = _attention_reference(
            q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS, scale, dropout_rate, rng, return_weights=True
        )
        _recording.append(weights)
        return out
    return ATTENTION_IMPLS[impl](q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS, scale, dropout_rate, rng)


_recording: list | None = None


@contextlib.contextmanager
def record_weights():
    """Within this context every attention() call runs the reference path and appends its softmax weights
    (B, H, L, S) float32 to the yielded list, in call order (a model's layers, a decoder block's self
    then cross attention). The list holds values of the trace it was filled in: call the model and
    return the list from one function, with unrolled layers (scan_layers=False, remat='none')."""
    global _recording
    outer, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = outer
