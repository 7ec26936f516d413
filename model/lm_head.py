"""The output projection fused with its cross-entropy, computed over chunks of the sequence.

``logits = x @ w^T`` is the biggest array of a language model's step (B * L * V floats: 262 MB at the
CPU benchmark shape, GBs at GPT-2 sizes). Written with autodiff, XLA materialises it, passes over it
for the max, the exp-sum and the softmax gradient, and materialises the gradient too. Here the
gradient is formed in the forward pass, one sequence chunk at a time (the Liger-kernel / MaxText
vocabulary-tiling idea): per chunk, logits -> log-sum-exp -> (softmax - one-hot) -> dx and dw,
so only one chunk of logits ever exists and it is still in cache when its gradient is taken.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd as flax_spmd

from podformer.core import sharding
from podformer.model import host_blas, kernels, vocab

Array = jax.Array

# Largest logits chunk (float32 bytes) formed at once. Smaller chunks cost speed on XLA:CPU (every chunk
# packs the vocabulary-sized weight again for two of its three matmuls: LM head fwd+bwd measured at 1.02,
# 1.11 and 1.21 CPU-s for 4, 8 and 16 chunks at the CPU benchmark shape) and bring no memory there (the
# step's peak is elsewhere: 459 MiB either way, 801 MiB unfused); they matter for big vocabularies x long
# sequences on one accelerator (a 1.3B GPT on one H200: 3.3 GB of logits -> 16 chunks).
CHUNK_BYTES = 256 * 2**20


def num_chunks(batch: int, length: int, vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Sequence chunks for the fused loss: the fewest whose float32 logits on one device (its rows of the
    batch, under the active mesh and rules) fit ``budget``.

    Under a mesh each chunk's weight gradient is reduce-scattered into the weight's shards as the chunk is
    done (the scan's carry is constrained to them, ``_fused_fwd``): one reduction per chunk, over the
    fsdp axis that also gathers every weight each step, and only one chunk of logits exists at a time
    (LLaMA-2 70B on 256 chips: 2 GiB of logits per chip in one chunk, 256 MiB in 8)."""
    rows = batch // _batch_shards(batch)
    for c in range(1, length + 1):
        if length % c == 0 and rows * (length // c) * vocab * 4 <= budget:
            return c
    return length


def _batch_shards(batch: int) -> int:
    mesh = jax.sharding.get_abstract_mesh()
    rules = flax_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return 1
    (axes,) = sharding.logical_to_spec(("batch",), rules, (batch,), dict(mesh.shape))
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _chunk_stats(x_BcD, w_VD, b_V, t_Bc, vocab_size):
    """Per chunk: exp(logits - row max), its sum, the token cross-entropies, correct predictions. Padded
    columns (from ``vocab_size`` on) get exp = 0, so their gradient rows below are exactly zero too."""
    logits = jnp.einsum("BcD,VD->BcV", x_BcD, w_VD, preferred_element_type=jnp.float32)
    if b_V is not None:
        logits = logits + b_V.astype(jnp.float32)
    logits = vocab.mask(logits, vocab_size)
    row_max = jnp.max(logits, axis=-1)
    e = jnp.exp(logits - row_max[..., None])
    s = jnp.sum(e, axis=-1)
    target = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
    ce_Bc = jnp.log(s) + row_max - target
    correct_Bc = (target >= row_max).astype(jnp.float32)
    return e, s, ce_Bc, correct_Bc


def _host_chunk(x_BcD, w_VD, b_V, t_Bc, wt_Bc, grad: bool, vocab_size: int):
    """A chunk on a CPU (model/host_blas.py): the logits from the host BLAS, then the loss and, with
    ``grad``, the logits' gradient in one pass per row. Returns (gradient (B*c, V) or None, ce, correct)."""
    B, c, D = x_BcD.shape
    logits_MV = host_blas.matmul(x_BcD.reshape(B * c, D), w_VD, transpose_b=True)
    if b_V is not None:
        logits_MV = logits_MV + b_V
    logits_MV = vocab.mask(logits_MV, vocab_size)
    g_MV, ce, correct = host_blas.softmax_cross_entropy(logits_MV, t_Bc.reshape(-1), wt_Bc.reshape(-1), grad=grad)
    return g_MV, ce.reshape(B, c), correct.reshape(B, c)


def _chunk_loss_host(x_BcD, w_VD, b_V, t_Bc, wt_Bc, vocab_size):
    _, ce, correct = _host_chunk(x_BcD, w_VD, b_V, t_Bc, wt_Bc, grad=False, vocab_size=vocab_size)
    return ce, correct


@kernels.dispatch(host=_chunk_loss_host)
def _chunk_loss(x_BcD, w_VD, b_V, t_Bc, wt_Bc, vocab_size):
    """A chunk's (token cross-entropies, correct predictions)."""
    _, _, ce, correct = _chunk_stats(x_BcD, w_VD, b_V, t_Bc, vocab_size)
    return ce, correct


def _chunk_grads_host(x_BcD, w_VD, b_V, t_Bc, wt_Bc, vocab_size):
    B, c, D = x_BcD.shape
    g_MV, ce, correct = _host_chunk(x_BcD, w_VD, b_V, t_Bc, wt_Bc, grad=True, vocab_size=vocab_size)
    dx = host_blas.matmul(g_MV, w_VD).reshape(B, c, D)
    dw_DV = host_blas.matmul(x_BcD.reshape(B * c, D), g_MV, transpose_a=True)
    db_V = None if b_V is None else jnp.sum(g_MV, axis=0)
    return ce, correct, dx, dw_DV, db_V


@kernels.dispatch(host=_chunk_grads_host)
def _chunk_grads(x_BcD, w_VD, b_V, t_Bc, wt_Bc, vocab_size):
    """A chunk's (ce, correct) and the gradients of sum(wt * ce): dx, this chunk's dw (D, V) and db."""
    V = w_VD.shape[0]
    e, s, ce, correct = _chunk_stats(x_BcD, w_VD, b_V, t_Bc, vocab_size)
    # d(sum_i wt_i * ce_i) / d logits = wt * (softmax - one_hot(target)).
    g = e * (wt_Bc / s)[..., None] - jax.nn.one_hot(t_Bc, V, dtype=jnp.float32) * wt_Bc[..., None]
    g = g.astype(x_BcD.dtype)  # bf16 compute: the two gradient matmuls take bf16 inputs, accumulate f32
    dx = jnp.einsum("BcV,VD->BcD", g, w_VD, preferred_element_type=jnp.float32).astype(x_BcD.dtype)
    # (D, V), not (V, D): both operands then contract over their leading (token) axes in the layout
    # they already have; the (V, D) form makes XLA:CPU transpose the vocabulary-sized g first.
    dw_DV = jnp.einsum("BcD,BcV->DV", x_BcD, g, preferred_element_type=jnp.float32)
    db_V = None if b_V is None else jnp.sum(g.astype(jnp.float32), axis=(0, 1))
    return ce, correct, dx, dw_DV, db_V


def _split(a, chunks):
    """(B, L, ...) -> (chunks, B, L / chunks, ...): chunks along the sequence keep the batch axis
    (and so its sharding) intact."""
    B, L = a.shape[:2]
    return jnp.swapaxes(a.reshape((B, chunks, L // chunks) + a.shape[2:]), 0, 1)


def _merge(a):
    return jnp.swapaxes(a, 0, 1).reshape((a.shape[1], -1) + a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _fused(x_BLD, w_VD, b_V, targets_BL, weights_BL, chunks, vocab_size):
    def body(_, xs):
        x, t, wt = xs
        return None, _chunk_loss(x, w_VD, b_V, t, wt, vocab_size)

    xs = (_split(x_BLD, chunks), _split(targets_BL, chunks), _split(weights_BL, chunks))
    _, (ce, correct) = jax.lax.scan(body, None, xs)
    ce, correct = _merge(ce), _merge(correct)
    return jnp.sum(ce * weights_BL), jnp.sum(correct * weights_BL)


def _fused_fwd(x_BLD, w_VD, b_V, targets_BL, weights_BL, chunks, vocab_size):
    def body(carry, xs):
        dw_DV, db_V = carry
        x, t, wt = xs
        ce, correct, dx, dw_chunk, db_chunk = _chunk_grads(x, w_VD, b_V, t, wt, vocab_size)
        # Into the weight's shards now: a replicated carry would hold (and all-reduce) the whole (D, V)
        # float32 gradient on every device.
        dw_DV = sharding.constrain(dw_DV + dw_chunk, ("embed", "vocab"))
        db_V = None if db_V is None else db_V + db_chunk
        return (dw_DV, db_V), (ce, correct, dx)

    xs = (_split(x_BLD, chunks), _split(targets_BL, chunks), _split(weights_BL, chunks))
    init = (jnp.zeros(w_VD.shape[::-1], jnp.float32), None if b_V is None else jnp.zeros(b_V.shape, jnp.float32))
    (dw_DV, db_V), (ce, correct, dx) = jax.lax.scan(body, init, xs)
    ce, correct = _merge(ce), _merge(correct)
    out = (jnp.sum(ce * weights_BL), jnp.sum(correct * weights_BL))
    db_V = None if db_V is None else db_V.astype(b_V.dtype)
    return out, (_merge(dx), dw_DV.T.astype(w_VD.dtype), db_V, ce, correct, targets_BL)


def _fused_bwd(chunks, vocab_size, res, cotangents):
    dx, dw, db, ce, correct, targets = res
    g_ce, g_correct = cotangents
    # The accuracy is piecewise constant in x, w and b: it only has a gradient through the weights.
    d_weights = g_ce * ce + g_correct * correct
    zero_targets = jnp.zeros(targets.shape, jax.dtypes.float0)
    db = None if db is None else db * g_ce.astype(db.dtype)
    return (dx * g_ce.astype(dx.dtype), dw * g_ce.astype(dw.dtype), db, zero_targets, d_weights.astype(jnp.float32))


_fused.defvjp(_fused_fwd, _fused_bwd)


def cross_entropy(
    x_BLD: Array,
    w_VD: Array,
    targets_BL: Array,
    weights_BL: Array,
    *,
    bias_V: Array | None = None,
    chunks: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Array, Array]:
    """(sum of weighted token cross-entropies, sum of weighted correct predictions) for the logits
    ``x_BLD @ w_VD^T (+ bias_V)``, in float32, without materialising them. A prediction is correct
    when the target's logit is the row maximum. ``vocab_size``: the real vocabulary of a padded ``w_VD``
    (model/vocab.py); the rows from it on are masked out of the softmax (default: none are padding)."""
    B, L, _ = x_BLD.shape
    if chunks is None:
        chunks = num_chunks(B, L, w_VD.shape[0])
    if L % chunks:
        raise ValueError(f"chunks={chunks} does not divide the sequence length {L}")
    w_VD = w_VD.astype(x_BLD.dtype)
    bias_V = None if bias_V is None else bias_V.astype(x_BLD.dtype)
    vocab_size = w_VD.shape[0] if vocab_size is None else vocab_size
    return _fused(x_BLD, w_VD, bias_V, targets_BL, weights_BL.astype(jnp.float32), chunks, vocab_size)
