"""Mixture-of-experts routing and dispatch, as functions on arrays; layers.MoE holds the parameters.

Shape suffixes as in layers.py, plus T tokens (B * L flattened), E experts, C capacity per expert,
A assignments (T * k, the top-k choices of every token), F the expert width.

Router (float32): softmax over E logits, then top-k (Switch k=1, GShard/GLaM/Mixtral k=2); the k weights
are optionally renormalised to sum to 1 (GShard, Mixtral, Qwen3-MoE) or kept as the softmax gave them
(Switch, OLMoE). Two dispatch modes compute the same function when nothing is dropped:

- capacity (GShard, GLaM, Switch): tokens route in groups (moe_group_size: the batch, one sequence, or
  a number of tokens); in each group each expert takes at most C = ceil(capacity_factor * S * k / E)
  assignments (S tokens per group; or expert_capacity), served in priority order -- every token's first
  choice, in token order, then every second choice, ... (GShard's rule: a second choice only takes room
  left by first choices) -- and those beyond C are dropped: that expert adds nothing, the token passes
  on through the residual.
- dropless (MaxText's megablox path): assignments sorted by expert and multiplied with one grouped
  matmul (jax.lax.ragged_dot); used at inference, where no token may be dropped.

Auxiliary terms, each a mean over the MoE layers of a stack (``collect``): the load-balancing loss
E * sum_e f_e * P_e (Switch eq. 4; f_e the share of the T*k assignments routed to e, P_e the mean router
probability of e; 1 when balanced), the router z-loss mean_t logsumexp(logits_t)^2 (ST-MoE eq. 5), the share
of assignments dropped and the load balance max_e n_e / mean_e n_e (n_e assignments routed to e).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

STATS = ("moe_aux_loss", "moe_lb_loss", "moe_z_loss", "moe_dropped", "moe_balance")


def route(logits_TE: Array, k: int, renormalize: bool) -> tuple[Array, Array, Array]:
    """(weights_TK, experts_TK, probs_TE) from float32 router logits: softmax, then top-k."""
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TE, k)
    if renormalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK, experts_TK, probs_TE


def capacity(tokens: int, k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * tokens * k / num_experts))


def positions(experts_TK: Array, num_experts: int) -> Array:
    """Each assignment's slot in its expert's buffer under GShard's priority: choice-major, then token."""
    onehot_KTE = jax.nn.one_hot(experts_TK.T, num_experts, dtype=jnp.int32)
    flat_AE = onehot_KTE.reshape(-1, num_experts)
    slot_AE = jnp.cumsum(flat_AE, axis=0) - 1
    slot_A = jnp.sum(slot_AE * flat_AE, axis=-1)
    return slot_A.reshape(experts_TK.T.shape).T  # (T, K)


def aux_stats(logits_TE: Array, probs_TE: Array, experts_TK: Array, kept_TK: Array) -> dict[str, Array]:
    E = probs_TE.shape[-1]
    counts_E = jnp.sum(jax.nn.one_hot(experts_TK, E, dtype=jnp.float32), axis=(0, 1))
    f_E = counts_E / jnp.sum(counts_E)
    p_E = jnp.mean(probs_TE, axis=0)
    z = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
    return {
        "moe_lb_loss": E * jnp.sum(jax.lax.stop_gradient(f_E) * p_E),
        "moe_z_loss": jnp.mean(jnp.square(z)),
        "moe_dropped": jax.lax.stop_gradient(1.0 - jnp.mean(kept_TK.astype(jnp.float32))),
        "moe_balance": jax.lax.stop_gradient(jnp.max(counts_E) / jnp.mean(counts_E)),
    }


def group_size(setting: int, B: int, L: int) -> int:
    """Tokens per routing group: moe_group_size (0: all B * L; -1: one sequence, L), dividing B * L."""
    S = {0: B * L, -1: L}.get(setting, setting)
    if (B * L) % S:
        raise ValueError(f"moe_group_size={setting} does not divide the batch's {B} x {L} tokens")
    return S


# The dispatch buffer's two layouts: as built, each group on its tokens' devices (the batch axes); for the
# experts, expert e's rows on the devices holding expert e and the groups over the rest of the batch axes.
# The constraint between them is GShard's all-to-all over the expert axis.
GROUPS_AXES = ("batch", None, None, None)  # (G, E, C, D)
EXPERTS_AXES = ("expert", "expert_group", None, None)  # (E, G, C, D)


def dispatch_capacity(x_GSD: Array, weights_GSK: Array, experts_GSK: Array, expert_fn, cap: int, constrain):
    """sum_k w_k * expert_{e_k}(x) over the assignments within capacity, each of the G groups of S tokens
    routed on its own (GShard's rule within a group); (y_GSD, kept_GSK). ``constrain(x, axes)`` places the
    (G, E, C, D) buffers (sharding.constrain; the identity in unit tests)."""
    G, S, D = x_GSD.shape
    K, E = experts_GSK.shape[-1], expert_fn.num_experts
    slot_GSK = jax.vmap(positions, in_axes=(0, None))(experts_GSK, E)
    kept_GSK = slot_GSK < cap
    # Dropped assignments write to (and read from) one spare row past the E * C real ones.
    index_GSK = jnp.where(kept_GSK, experts_GSK * cap + slot_GSK, E * cap)

    def scatter(x_SD, index_SK):
        rows = jnp.zeros((E * cap + 1, D), x_SD.dtype).at[index_SK.reshape(-1)].set(jnp.repeat(x_SD, K, axis=0))
        return rows[: E * cap].reshape(E, cap, D)

    buf_GECD = constrain(jax.vmap(scatter)(x_GSD, index_GSK), GROUPS_AXES)
    buf_EGCD = constrain(jnp.swapaxes(buf_GECD, 0, 1), EXPERTS_AXES)
    out_EGCD = expert_fn(buf_EGCD.reshape(E, G * cap, D)).reshape(E, G, cap, D)
    out_GECD = constrain(jnp.swapaxes(constrain(out_EGCD, EXPERTS_AXES), 0, 1), GROUPS_AXES)
    out = jnp.concatenate([out_GECD.reshape(G, E * cap, D), jnp.zeros((G, 1, D), out_GECD.dtype)], axis=1)
    y_GSKD = jax.vmap(lambda o, i: jnp.take(o, i, axis=0))(out, index_GSK)
    w_GSK = jnp.where(kept_GSK, weights_GSK, 0.0).astype(y_GSKD.dtype)
    return jnp.einsum("GSKD,GSK->GSD", y_GSKD, w_GSK), kept_GSK


def dispatch_dropless(x_TD: Array, weights_TK: Array, experts_TK: Array, expert_fn):
    """Every assignment served: sorted by expert, one grouped matmul per expert weight (ragged_dot)."""
    T, K = experts_TK.shape
    E = expert_fn.num_experts
    flat_A = experts_TK.reshape(-1)
    order_A = jnp.argsort(flat_A, stable=True)
    sizes_E = jnp.bincount(flat_A, length=E).astype(jnp.int32)
    x_AD = jnp.take(x_TD, order_A // K, axis=0)
    y_AD = expert_fn.grouped(x_AD, sizes_E)
    y_AD = jnp.zeros_like(y_AD).at[order_A].set(y_AD)  # back to (token, choice) order
    y_TKD = y_AD.reshape(T, K, -1)
    return jnp.einsum("TKD,TK->TD", y_TKD, weights_TK.astype(y_TKD.dtype)), jnp.ones((T, K), bool)


def collect(model: nnx.Module) -> dict[str, Array]:
    """Pop the MoE statistics the stacks of ``model`` sowed during its last call, each as its mean over the
    MoE layers; ``moe_aux_loss`` is the weighted auxiliary objective (moe_lb_weight * load balancing +
    moe_z_weight * z-loss). {} for a dense model (or one not called since)."""
    sown = nnx.pop(model, nnx.Intermediate)
    summed = None
    for path, v in nnx.to_flat_state(sown):
        if path[-1] == "moe_stats":
            for s in v.get_value():
                summed = add_stats(summed, {"layers": jnp.float32(1.0), **s})
    if summed is None:
        return {}
    summed = dict(summed)
    layers = summed.pop("layers")
    return {k: v / layers for k, v in summed.items()}


def add_stats(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return b if a is None else a
    return jax.tree.map(jnp.add, a, b)


def block_stats(block: nnx.Module) -> dict | None:
    """Pop what a block's MoE sowed in its call: {stat: value, 'layers': 1.0}, or None if dense."""
    sown = nnx.pop(block, nnx.Intermediate)
    found = [v for path, v in nnx.to_flat_state(sown) if path[-1] == "moe_stats"]
    out = None
    for v in found:
        for s in v.get_value():
            out = add_stats(out, {"layers": jnp.float32(1.0), **s})
    return out


def record(module: nnx.Module, stats: dict) -> None:
    """Keep ``stats`` on ``module`` as an nnx.Intermediate named ``moe_stats`` (what ``Module.sow`` does,
    which Flax now wants inside nnx.capture; the stacks and the trainer pop these themselves)."""
    previous = getattr(module, "moe_stats", None)
    module.moe_stats = nnx.Intermediate((*(previous.get_value() if previous is not None else ()), stats))
