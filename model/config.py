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
    # Mixture of experts (model/moe.py): num_experts > 0 makes every moe_every-th feed-forward layer sparse
    # (moe_every=2: layers 1, 3, 5, ..., the last of each period, as Switch and Qwen3-MoE; moe_first: the
    # first, layers 0, 2, 4, ..., as GShard and GLaM; 1: all, as Mixtral). Experts are gated or plain like the
    # family's dense MLP (expert_mlp="same"), or as expert_mlp says (GLaM: plain experts beside gated dense
    # layers), each expert_d_ff wide (0: d_ff); shared_experts dense experts of that width run on every
    # token (DeepSeek). moe_dispatch: capacity (GShard rule, capacity_factor) or dropless
    # (ragged_dot); decoding is always dropless.
    num_experts: int = 0
    moe_every: int = 1
    moe_first: bool = False
    expert_mlp: str = "same"  # same | plain | gated
    experts_per_token: int = 2
    expert_d_ff: int = 0
    shared_experts: int = 0
    router_renormalize: bool = True  # top-k weights renormalised to sum to 1 (GShard, Mixtral; not Switch)
    router_jitter: float = 0.0  # training: router input * U(1 - eps, 1 + eps) (Switch)
    moe_dispatch: str = "dropless"  # dropless | capacity
    capacity_factor: float = 1.25
    # Capacity routing in groups (GShard): each group of moe_group_size consecutive tokens routes on its own,
    # C per expert per group, so the dispatch buffer (groups, E, C, D) shards over the batch axes. 0: the
    # whole batch one group; -1: one group per sequence (Switch Transformers' rule in transformers).
    moe_group_size: int = 0
    expert_capacity: int = 0  # tokens per expert per group; 0: ceil(capacity_factor * group * k / E)
    moe_lb_weight: float = 0.01  # load-balancing loss weight (Switch: 0.01)
    moe_z_weight: float = 0.001  # router z-loss weight (ST-MoE: 0.001)

    def __post_init__(self):
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts:
                raise ValueError(f"experts_per_token={self.experts_per_token} must be in 1..num_experts")
            if self.moe_every < 1 or self.num_layers % self.moe_every:
                raise ValueError(f"num_layers={self.num_layers} must be a multiple of moe_every={self.moe_every}")
            if self.expert_mlp not in ("same", "plain", "gated"):
                raise ValueError(f"expert_mlp={self.expert_mlp!r}: choose same, plain or gated")
            if self.moe_dispatch not in ("dropless", "capacity"):
                raise ValueError(f"moe_dispatch={self.moe_dispatch!r}: choose dropless or capacity")
            if self.moe_group_size < -1 or self.expert_capacity < 0:
                raise ValueError("moe_group_size must be -1, 0 or a token count; expert_capacity >= 0")
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

    @property
    def resolved_expert_d_ff(self) -> int:
        return self.expert_d_ff or self.resolved_d_ff


def preset(fields: dict):
    """A named preset as a classmethod: ``GPTConfig.llama_7b(**overrides)``."""
    return classmethod(lambda cls, **kw: cls(**{**fields, **kw}))
