"""The bidirectional encoders' configs and presets (BERT, RoBERTa, DistilBERT); JAX-free, for run configs.
The module is model/bert.py."""

from __future__ import annotations

import dataclasses

from podformer.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
    vocab_size: int = 30522
    max_len: int = 512
    d_ff: int = 3072
    norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    type_vocab_size: int = 2  # token types (segments A/B); 0: none (DistilBERT)
    pad_token_id: int = 0
    # RoBERTa: positions count non-pad tokens from pad_token_id + 1, so row p + 2 holds position p and the
    # positions of a padded row come from its input ids (exactly as fairseq and transformers do).
    pos_offset: int = 0
    positions_from_pad: bool = False
    pooler: bool = True  # tanh dense layer on the first token ([CLS])
    nsp_head: bool = True  # next-sentence prediction on the pooled output (BERT pretraining)

    def __post_init__(self):
        super().__post_init__()
        if self.nsp_head and not self.pooler:
            raise ValueError("nsp_head needs the pooler (it classifies the pooled [CLS] vector)")

    # Presets (Devlin et al. 2019; Liu et al. 2019; Sanh et al. 2019), sized as the released checkpoints.
    @classmethod
    def tiny(cls, **kw) -> BertConfig:
        return cls(**{**dict(vocab_size=4096, max_len=128, d_model=128, num_layers=2, num_heads=4, d_ff=512), **kw})

    @classmethod
    def base_uncased(cls, **kw) -> BertConfig:
        return cls(**kw)

    @classmethod
    def large_uncased(cls, **kw) -> BertConfig:
        return cls(**{**dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096), **kw})

    @classmethod
    def base_cased(cls, **kw) -> BertConfig:
        return cls(**{**dict(vocab_size=28996), **kw})

    @classmethod
    def large_cased(cls, **kw) -> BertConfig:
        return cls.large_uncased(**{**dict(vocab_size=28996), **kw})


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """RoBERTa: BERT's architecture with a byte-level BPE vocabulary, no NSP, padding-offset positions."""

    vocab_size: int = 50265
    type_vocab_size: int = 1
    norm_eps: float = 1e-5
    pad_token_id: int = 1
    pos_offset: int = 2
    positions_from_pad: bool = True
    pooler: bool = False
    nsp_head: bool = False

    @classmethod
    def base(cls, **kw) -> RobertaConfig:
        return cls(**kw)

    @classmethod
    def large(cls, **kw) -> RobertaConfig:
        return cls(**{**dict(d_model=1024, num_layers=24, num_heads=16, d_ff=4096), **kw})


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(BertConfig):
    """DistilBERT: six layers, no token types, no pooler."""

    num_layers: int = 6
    type_vocab_size: int = 0
    pooler: bool = False
    nsp_head: bool = False

    @classmethod
    def base(cls, **kw) -> DistilBertConfig:
        return cls(**kw)
