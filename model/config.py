"""What every family config shares: one frozen base dataclass for the common fields (JAX-free, so run
configs and ``--help`` load without JAX)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields every family has. A family subclasses this, changes defaults and adds its own options;
    model/layers.py ``block_options`` turns these into the shared block's options in one place."""

    vocab_size: int = 32000  # the tokenizer's
    # The token tables have padded_vocab_size rows (a multiple of this; 1: none), so they shard over tensor;
    # the padding is masked out of every softmax and never leaves the model (model/vocab.py).
    vocab_multiple: int = 128
    max_len: int = 1024  # longest sequence; learned positions: the table has max_len + pos_offset rows
    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    head_dim: int = 0  # 0: d_model // num_heads
    d_ff: int = 0  # 0: 4 * d_model
    activation: str = "gelu"
    norm_eps: float = 1e-5
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

    @property
    def padded_vocab_size(self) -> int:
        """The rows of the token tables: vocab_size rounded up to a multiple of vocab_multiple (model/vocab.py)."""
        m = max(self.vocab_multiple, 1)
        return -(-self.vocab_size // m) * m

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff or 4 * self.d_model


def preset(fields: dict):
    """A named preset as a classmethod: ``GPTConfig.llama_7b(**overrides)``."""
    return classmethod(lambda cls, **kw: cls(**{**fields, **kw}))
