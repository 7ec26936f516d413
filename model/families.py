"""The family record: one row per model family, everything podformer knows about it in one place.

A row names the family's config dataclass and its module, how it reads a sequence (its kind), the
objective it pretrains with (and so the special tokens its tokenizer gets, data/special.py), how
fine-tuning frames text for it and what its decoder starts from, the Hugging Face formats it reads
and writes (model/hf_*.py), and the fine-tuning heads it takes (model/heads.py). Tables elsewhere
are read from these rows; the trainer never names a family. JAX-free: run configs, ``--help`` and
config errors use it before JAX loads; the module itself is imported on first use.
"""

from __future__ import annotations

import dataclasses
import importlib

from podformer.core.errors import UserError
from podformer.data.special import Framing
from podformer.model.bert_config import BertConfig, DistilBertConfig, RobertaConfig
from podformer.model.config import ModelConfig
from podformer.model.gpt_config import GPTConfig
from podformer.model.t5_config import BartConfig, T5Config

KINDS = ("encoder", "decoder", "seq2seq")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # what run configs put in model.family, and checkpoints record
    config: type[ModelConfig]  # its frozen config dataclass (exactly this class: subclasses are other families)
    module: str  # 'package.module:Class' of the nnx.Module, imported on first use (it loads JAX)
    kind: str  # encoder | decoder | seq2seq: how it reads a sequence (fine-tuning heads, generation)
    objective: str  # the pretraining objective of its configs (data/pipeline.py), hence its tokenizer's tokens
    framing: Framing  # special tokens around texts (fine-tuning rows, exported tokenizers), decoder start
    hf_formats: tuple[str, ...]  # transformers model_types it converts (model/hf_*.py); export tries them in order
    heads: tuple[str, ...]  # the fine-tuning heads it takes (model/heads.py HEADS)

    def module_class(self):
        """The family's nnx.Module class (importing it loads JAX, which is why it is not imported above)."""
        module, _, name = self.module.partition(":")
        return getattr(importlib.import_module(module), name)


_ENCODER_HEADS = ("sequence", "span", "token")
_SEQ2SEQ_HEADS = ("sequence", "lm")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="gpt",
            config=GPTConfig,
            module="podformer.model.gpt:GPT",
            kind="decoder",
            objective="causal_lm",
            framing=Framing(start="<s>", sep=None),  # documents start with bos
            hf_formats=("gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "llama", "mixtral", "qwen3_moe"),
            heads=("sequence", "span", "token", "lm"),
        ),
        Family(
            name="bert",
            config=BertConfig,
            module="podformer.model.bert:Bert",
            kind="encoder",
            objective="mlm",
            framing=Framing(start="[CLS]", sep="[SEP]"),
            hf_formats=("bert",),
            heads=_ENCODER_HEADS,
        ),
        Family(
            name="roberta",
            config=RobertaConfig,
            module="podformer.model.bert:Bert",
            kind="encoder",
            objective="roberta",
            framing=Framing(start="<s>", sep="</s>", double_sep=True),
            hf_formats=("roberta",),
            heads=_ENCODER_HEADS,
        ),
        Family(
            name="distilbert",
            config=DistilBertConfig,
            module="podformer.model.bert:Bert",
            kind="encoder",
            objective="distill",  # from a BERT teacher; its tokenizer is BERT's
            framing=Framing(start="[CLS]", sep="[SEP]"),
            hf_formats=("distilbert",),
            heads=_ENCODER_HEADS,
        ),
        Family(
            name="t5",
            config=T5Config,
            module="podformer.model.t5:T5",
            kind="seq2seq",
            objective="span_corruption",
            framing=Framing(start=None, sep="</s>", decoder_start="pad"),
            hf_formats=("t5", "mt5", "switch_transformers"),
            heads=_SEQ2SEQ_HEADS,
        ),
        Family(
            name="bart",
            config=BartConfig,
            module="podformer.model.t5:T5",
            kind="seq2seq",
            objective="bart",
            framing=Framing(start="<s>", sep="</s>", double_sep=True, decoder_start="eos"),
            hf_formats=("bart",),
            heads=_SEQ2SEQ_HEADS,
        ),
    )
}


def get(name: str) -> Family:
    """The row of ``name``; an unknown name is a user error listing the families."""
    if name not in FAMILIES:
        raise UserError(f"model.family={name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def find(cfg) -> Family | None:
    """The row whose config class ``cfg`` is (exactly: RobertaConfig is not BERT's), or None."""
    return next((f for f in FAMILIES.values() if type(cfg) is f.config), None)


def of(cfg: ModelConfig) -> Family:
    """The row whose config class ``cfg`` is; anything else is a user error."""
    if (found := find(cfg)) is not None:
        return found
    raise UserError(f"{type(cfg).__name__} is not a podformer family config; families: {', '.join(FAMILIES)}")


def of_format(model_type: str) -> Family:
    """The row that converts transformers' ``model_type``."""
    for f in FAMILIES.values():
        if model_type in f.hf_formats:
            return f
    raise UserError(f"model_type {model_type!r} belongs to no podformer family")
