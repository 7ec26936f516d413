"""AdamW with linear warmup and cosine decay, global-norm clipping, no weight decay on biases/norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from podformer.core.errors import UserError

NO_DECAY = ("bias", "scale")  # parameter names (last path element) that are never decayed
MOMENT_DTYPES = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}  # opt.mu_dtype


SCHEDULES = ("cosine", "linear", "constant")  # opt.schedule (configs without the key: cosine)


def schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    decay_steps = opt_cfg.decay_steps or total_steps
    warmup = min(opt_cfg.warmup_steps, decay_steps)
    kind = opt_cfg.get("schedule", "cosine")
    if kind not in SCHEDULES:
        raise UserError(f"opt.schedule={kind!r}; choose one of {', '.join(SCHEDULES)}")
    if kind != "cosine":  # fine-tuning: BERT's warmup + linear decay, or warmup + constant
        end = opt_cfg.lr * opt_cfg.min_lr_ratio if kind == "linear" else opt_cfg.lr
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, opt_cfg.lr, max(warmup, 1)),
                optax.linear_schedule(opt_cfg.lr, end, max(decay_steps - warmup, 1)),
            ],
            [max(warmup, 1)],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(decay_steps, warmup + 1),
        end_value=opt_cfg.lr * opt_cfg.min_lr_ratio,
    )


def _last_name(path) -> str:
    for entry in reversed(path):
        name = getattr(entry, "key", getattr(entry, "name", None))
        if isinstance(name, str) and name != "value":
            return name
    return ""


def decay_mask(params):
    # By name, not by rank: with a scanned layer stack every bias is 2-D (layers, features).
    return jax.tree_util.tree_map_with_path(lambda path, _: _last_name(path) not in NO_DECAY, params)


def scale_by_path(factor) -> optax.GradientTransformation:
    """Multiply each update by ``factor(path, update)`` (a float, or an array broadcasting against it):
    with AdamW that is a per-parameter learning rate, e.g. layer-wise decay (finetuning.layer_decay)."""

    def update(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p, u), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg, total_steps: int, lr_factor=None) -> optax.GradientTransformation:
    if opt_cfg.get("mu_dtype", "") not in MOMENT_DTYPES:
        raise UserError(f"opt.mu_dtype={opt_cfg.mu_dtype!r}; choose one of {', '.join(repr(k) for k in MOMENT_DTYPES)}")
    parts = []
    if opt_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
    parts.append(
        optax.adamw(
            schedule(opt_cfg, total_steps),
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
            mask=decay_mask,
            mu_dtype=MOMENT_DTYPES[opt_cfg.get("mu_dtype", "")],
        )
    )
    if lr_factor is not None:
        parts.append(scale_by_path(lr_factor))
    return optax.chain(*parts)
