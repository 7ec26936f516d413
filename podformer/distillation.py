"""DistilBERT's distillation run (``data.objective=distill``): the teacher, its loss, the student's start.

The teacher is a BERT-family encoder read from a podformer workdir or a Hugging Face folder. It lives in
the train state (podformer/trainer.py ``TrainState.teacher``): sharded like the student, saved with every
checkpoint so a resume needs nothing else, and never differentiated or updated.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from podformer.core.errors import UserError
from podformer.metrics import log
from podformer.model import families, hf, params
from podformer.objective_losses import make_distillation

# The families a teacher and a student may be: the encoders (model/families.py).
ENCODERS = tuple(name for name, f in families.FAMILIES.items() if f.kind == "encoder")


@dataclasses.dataclass
class Teacher:
    make: object  # nnx.Rngs -> the teacher module (for the abstract and the initial train state)
    params: dict[str, np.ndarray]  # its canonical parameters (model/params.py)
    loss: object  # podformer.losses.Loss
    student_init: dict[str, np.ndarray] | None  # the student's starting parameters, from the teacher
    num_layers: int


def load(cfg, model_cfg) -> Teacher:
    """The teacher named by ``cfg.distill.teacher``, checked against the student (``model_cfg``)."""
    if cfg.model.family not in ENCODERS or "distill" not in cfg:
        raise UserError(
            f"data.objective=distill trains a BERT-family student; model.family={cfg.model.family!r} is not "
            f"one of {', '.join(ENCODERS)}"
        )
    d = cfg.distill
    if not d.teacher:
        raise UserError("data.objective=distill needs a teacher: --config.distill.teacher=WORKDIR_OR_HF_FOLDER")
    if "://" not in d.teacher and not os.path.exists(d.teacher):
        raise UserError(
            f"distill.teacher={d.teacher}: no such workdir or folder; train a teacher first "
            "(python train.py --config=configs/bert.py:tiny writes runs/bert_tiny) or pass --config.distill.teacher"
        )
    try:
        family, teacher_cfg, flat = hf.load_params(d.teacher)
    except (hf.HFError, FileNotFoundError) as e:
        raise UserError(f"distill.teacher={d.teacher}: {e}") from None
    if family not in ENCODERS:
        raise UserError(f"distill.teacher={d.teacher} holds a {family} model; the teacher must be one of {ENCODERS}")
    if teacher_cfg.vocab_size != model_cfg.vocab_size:
        raise UserError(
            f"distill.teacher={d.teacher} has vocab_size {teacher_cfg.vocab_size}, the student "
            f"{model_cfg.vocab_size}: distillation needs one tokenizer; set model.vocab_size and data.tokenizer"
        )
    same_width = teacher_cfg.d_model == model_cfg.d_model
    if d.alpha_cos > 0 and not same_width:
        raise UserError(
            f"distill.alpha_cos={d.alpha_cos} compares hidden states, but the teacher is {teacher_cfg.d_model} "
            f"wide and the student {model_cfg.d_model}; set --config.distill.alpha_cos=0 or equal widths"
        )
    # The teacher computes in the student's dtype; how it was trained (dropout, layout) does not matter.
    # Its vocabulary is padded as the student's: the soft targets compare the two padded logits column
    # for column (its parameters are read unpadded and padded again to fit).
    teacher_cfg = dataclasses.replace(
        teacher_cfg,
        dtype=model_cfg.dtype,
        dropout=0.0,
        attention_dropout=0.0,
        vocab_multiple=model_cfg.vocab_multiple,
    )
    module_cls = families.get(family).module_class()
    loss = make_distillation(d.temperature, d.alpha_ce, d.alpha_mlm, d.alpha_cos)
    student_init = None
    if d.init_student and not cfg.init.checkpoint:
        if not same_width:
            raise UserError(
                f"distill.init_student copies teacher layers, but the teacher is {teacher_cfg.d_model} wide and the "
                f"student {model_cfg.d_model}; set --config.distill.init_student=false or equal widths"
            )
        student_init = student_from_teacher(flat, teacher_cfg.num_layers, model_cfg.num_layers)
    size = f"{teacher_cfg.num_layers} layers, d_model {teacher_cfg.d_model}"
    log(f"distillation: teacher {family} ({size}) from {d.teacher}")
    return Teacher(lambda rngs: module_cls(teacher_cfg, rngs=rngs), flat, loss, student_init, teacher_cfg.num_layers)


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher layer each student layer starts from: evenly spaced, first and last kept (DistilBERT's
    0, 2, 4, 7, 9, 11 for 6 of 12)."""
    if student_layers > teacher_layers:
        raise UserError(f"the student has {student_layers} layers, its teacher only {teacher_layers}")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(np.floor(i * step + 0.5)) for i in range(student_layers)]


def student_from_teacher(flat: dict[str, np.ndarray], teacher_layers: int, student_layers: int) -> dict:
    """The student's canonical parameters taken from the teacher's: embeddings, MLM head and the mapped
    layers. Teacher-only parts (token-type embeddings, pooler, NSP head) are left out."""
    mapping = layer_map(teacher_layers, student_layers)
    out = {}
    for name, value in flat.items():
        m = re.match(r"blocks\.(\d+)\.(.*)", name)
        if m is None:
            out[name] = value
            continue
        for i, t in enumerate(mapping):
            if int(m.group(1)) == t:
                out[f"blocks.{i}.{m.group(2)}"] = value
    return out


def place(teacher: Teacher, graphdef, state):
    """A fresh train state with the teacher's parameters in place (and the student's start, if any)."""
    ts = nnx.merge(graphdef, state)
    missing = params.set_params(ts.teacher, teacher.params, strict=False, allow_missing=True)
    # A teacher checkpoint lacks what was never imported nor trained (model/params.py read_workdir); only what
    # the teacher's outputs read must be there (not a pooler or NSP head its pretraining never used).
    ids = jax.ShapeDtypeStruct((jax.device_count(), 8), jnp.int32)
    needed = sorted(set(missing) & params.read_by(lambda m, x: m.mlm_logits(m.encode(x)), ts.teacher, ids))
    if needed:
        raise UserError(
            f"the distillation teacher lacks {needed[0]}: it needs a trained MLM head (a *ForMaskedLM folder, or a "
            "workdir pretrained with an MLM objective)"
        )
    if teacher.student_init is not None:
        params.set_params(ts.model, teacher.student_init, strict=False, allow_missing=True)
        log(f"student initialised from teacher layers {layer_map(teacher.num_layers, ts.model.cfg.num_layers)}")
    return nnx.state(ts)
