"""Fine-tuning pieces finetune.py composes: which model and tokenizer to start from, task losses,
layer-wise learning-rate decay, and the jitted prediction step."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from podformer.core.errors import UserError
from podformer.data import hf_tokenizer, pipeline
from podformer.losses import LOSSES, Loss
from podformer.model import families, hf, params

# task type -> the head it trains
HEAD_OF = {"classification": "sequence", "regression": "sequence", "qa": "span", "tagging": "token"}
HEAD_OF.update(text2text="lm", sft="lm")
# task type -> the model kinds it fine-tunes (model/families.py Family.kind)
KINDS_OF = {
    "classification": ("encoder", "decoder", "seq2seq"),
    "regression": ("encoder", "decoder", "seq2seq"),
    "qa": ("encoder", "decoder"),
    "tagging": ("encoder", "decoder"),
    "text2text": ("seq2seq",),
    "sft": ("decoder",),
}
_ADVICE = {
    "text2text": "use a T5 or BART checkpoint (or task.type=sft for a decoder)",
    "sft": "use a decoder (gpt family)",
}
TRAINING_FIELDS = ("dropout", "attention_dropout", "dtype", "scan_layers", "remat", "attention_impl")


def check_family(task_type: str, family: str, where: str) -> None:
    kind = families.get(family).kind
    if kind not in KINDS_OF[task_type]:
        advice = _ADVICE.get(task_type, f"use an {' or '.join(KINDS_OF[task_type])} checkpoint")
        raise UserError(
            f"{where} holds a {family} model (an {kind}); task.type={task_type} cannot fine-tune it: {advice}"
        )


# ---------------------------------------------------------------------------------------------------
# Where the model and tokenizer come from


@dataclasses.dataclass
class Start:
    family: str
    model_cfg: object  # the family dataclass the run builds
    flat: dict | None  # canonical parameters to load into the backbone (None: fresh or resumed)
    meta: dict  # the init checkpoint's metadata (podformer workdirs), else {}
    description: str


def resolve_start(cfg, config_lib, resumed_model: dict | None) -> Start:
    """The model to build. Resume order: this workdir's checkpoint (its saved model) -> init.checkpoint
    (its architecture; the run config's training fields such as dropout apply) -> the run config's model."""
    if resumed_model is not None:
        family, model_cfg = params.config_from_dict(resumed_model)
        return Start(family, model_cfg, None, {}, "resumed")
    path = cfg.init.checkpoint
    if path and not os.path.exists(path):
        if path != cfg.init.missing_ok:
            raise UserError(
                f"init.checkpoint {path} does not exist; pass a podformer workdir or a Hugging Face folder, or "
                "--config.init.checkpoint= to fine-tune a fresh, untrained model"
            )
        path = ""
        print(f"podformer: no checkpoint at {cfg.init.checkpoint}: fine-tuning a fresh, untrained model", flush=True)
    if not path:
        config_cls = families.get(cfg.model.family).config
        return Start(cfg.model.family, config_lib.family_config(cfg.model, config_cls), None, {}, "a fresh model")
    try:
        if params.is_workdir(path):
            family, src_cfg, flat, meta = params.read_workdir(path)
        else:
            family, src_cfg, flat = hf.load_params(path)
            meta = {}
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"init.checkpoint {path}: {e}") from None
    overrides = {f: cfg.model[f] for f in TRAINING_FIELDS if f in cfg.model and hasattr(src_cfg, f)}
    return Start(family, dataclasses.replace(src_cfg, **overrides), flat, meta, path)


def resolve_tokenizer(cfg, start: Start, workdir: str, resumed: bool):
    """The tokenizer: data.tokenizer if set; a resumed run's own copy (<workdir>/tokenizer); the init
    checkpoint's (a Hugging Face folder's files, an imported workdir's tokenizer/, or the tokenizer the
    pretraining run built, checked against its fingerprint); else the family's embedded-corpus one."""
    if cfg.data.tokenizer:
        return hf_tokenizer.load(cfg.data.tokenizer)
    own = os.path.join(workdir, "tokenizer")
    if resumed and os.path.isdir(own):
        return hf_tokenizer.load(own)
    path = cfg.init.checkpoint if start.flat is not None else ""
    if path:
        for folder in (path, os.path.join(path, "tokenizer")):
            if os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_NAMES):
                return hf_tokenizer.load(folder)
        data = start.meta.get("config", {}).get("data")
        if not data:
            raise UserError(f"init.checkpoint {path} has no tokenizer; set data.tokenizer to the model's tokenizer")
        tok = pipeline.tokenizer_for(ml_collections.ConfigDict(data), start.model_cfg.vocab_size)
        if start.meta.get("tokenizer") and tok.fingerprint != start.meta["tokenizer"]:
            raise UserError(
                f"init.checkpoint {path} was trained with tokenizer {start.meta['tokenizer']}, rebuilt "
                f"{tok.fingerprint}; set data.tokenizer to the one it used"
            )
        return tok
    # A fresh model: the tokenizer its family's pretraining config trains (configs/finetune/base.py data.fresh).
    fresh = ml_collections.ConfigDict({**cfg.data.fresh.to_dict(), "cache_dir": cfg.data.cache_dir})
    return pipeline.tokenizer_for(fresh, start.model_cfg.vocab_size)


_TOKENIZER_NAMES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def save_tokenizer(tok, workdir: str) -> None:
    """A copy of the tokenizer in <workdir>/tokenizer, so eval/predict and resumes find the same one."""
    if jax.process_index() == 0:
        hf_tokenizer.keep(tok, os.path.join(workdir, "tokenizer"))


# ---------------------------------------------------------------------------------------------------
# Losses: each returns metrics normalised by global-batch denominators (podformer/losses.py)


def _classification(model, batch, rng, denom):
    logits = model(batch, rng)
    logp = jax.nn.log_softmax(logits, axis=-1)
    w = batch["label_weights"]
    ce = -jnp.take_along_axis(logp, batch["labels"][:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
    n = jnp.maximum(denom["rows"], 1.0)
    return jnp.sum(ce * w) / n, {"loss": jnp.sum(ce * w) / n, "accuracy": jnp.sum(correct * w) / n}


def _regression(model, batch, rng, denom):
    pred = model(batch, rng)[:, 0]
    se = jnp.square(pred - batch["labels"]) * batch["label_weights"]
    n = jnp.maximum(denom["rows"], 1.0)
    return jnp.sum(se) / n, {"loss": jnp.sum(se) / n}


def _span(model, batch, rng, denom):
    logits = model(batch, rng)  # (B, L, 2)
    mask = batch["segment_ids"] > 0
    w = batch["label_weights"]
    total = 0.0
    for i, key in enumerate(("start_positions", "end_positions")):
        logp = jax.nn.log_softmax(jnp.where(mask, logits[..., i], -1e9), axis=-1)
        total = total + jnp.sum(-jnp.take_along_axis(logp, batch[key][:, None], axis=-1)[:, 0] * w)
    n = jnp.maximum(denom["rows"], 1.0)
    return total / (2 * n), {"loss": total / (2 * n)}


def _token(model, batch, rng, denom):
    logits = model(batch, rng)
    logp = jax.nn.log_softmax(logits, axis=-1)
    w = batch["label_weights"]
    ce = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
    n = jnp.maximum(denom["tokens"], 1.0)
    return jnp.sum(ce * w) / n, {"loss": jnp.sum(ce * w) / n, "accuracy": jnp.sum(correct * w) / n}


def _on_backbone(loss: Loss) -> Loss:
    return Loss(lambda model, batch, rng, denom: loss.fn(model.backbone, batch, rng, denom), loss.denominators)


def _rows(batch):
    return {"rows": jnp.sum(batch["label_weights"])}


TASK_LOSSES = {
    "classification": Loss(_classification, _rows),
    "regression": Loss(_regression, _rows),
    "qa": Loss(_span, _rows),
    "tagging": Loss(_token, lambda batch: {"tokens": jnp.sum(batch["label_weights"])}),
    "text2text": _on_backbone(LOSSES["span_corruption"]),  # the encoder-decoder LM loss on decoder_* keys
    "sft": _on_backbone(LOSSES["causal_lm"]),  # loss_weights: the completion only
}


# ---------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (ELECTRA, Clark et al. 2020; BEiT): layer i of N trains at lr * decay^(N - i),
# the embeddings at lr * decay^(N + 1), the head and final norms at lr.

_EMBEDDINGS = ("embed", "pos_embed", "token_type_embed", "embed_norm", "rel_bias")


def _name(entry):
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return None


def layer_decay(decay: float, num_layers: int):
    """``factor(path, update)`` for optim.make_optimizer's ``lr_factor``."""

    def factor(path, u):
        names = [_name(p) for p in path]
        if "backbone" not in names:
            return 1.0
        if "layers" in names:
            nxt = names[names.index("layers") + 1] if names.index("layers") + 1 < len(names) else None
            if isinstance(nxt, int) or (isinstance(nxt, str) and nxt.isdigit()):
                return decay ** (num_layers - int(nxt))
            n = u.shape[0]  # a scanned stack: one factor per layer along the leading axis
            f = decay ** (num_layers - jnp.arange(n, dtype=jnp.float32))
            return f.reshape((n,) + (1,) * (u.ndim - 1)).astype(u.dtype)
        if any(n in _EMBEDDINGS for n in names if isinstance(n, str)):
            return decay ** (num_layers + 1)
        return 1.0

    return factor


# ---------------------------------------------------------------------------------------------------
# Prediction


def jit_predict(graphdef, state_shardings, batch_shard, mesh, output: str):
    """``predict(state, batch)`` -> the head's outputs, replicated on every device (so every process
    reads all of them): class logits, span logits or per-token class ids."""

    def predict(state, batch):
        model = nnx.merge(graphdef, state).model
        out = model(batch)
        if output == "token":
            out = jnp.argmax(out, axis=-1).astype(jnp.int32)
        return out

    return jax.jit(
        predict, in_shardings=(state_shardings, batch_shard), out_shardings=NamedSharding(mesh, PartitionSpec())
    )
