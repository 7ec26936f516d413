"""The encoder-decoders' configs and presets (T5 v1.0 / v1.1, mT5, BART); JAX-free, for run configs.
The module is model/t5.py."""

from __future__ import annotations

import dataclasses

from podformer.model.config import ModelConfig, preset


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    vocab_size: int = 32128
    d_model: int = 512
    num_layers: int = 6  # encoder layers
    num_heads: int = 8
    head_dim: int = 64  # T5's d_kv: num_heads * head_dim need not equal d_model (T5 3B, 11B)
    d_ff: int = 2048
    activation: str = "relu"
    norm_eps: float = 1e-6
    dropout: float = 0.1
    num_decoder_layers: int = 0  # 0: num_layers
    gated_mlp: bool = False
    use_bias: bool = False  # biases in every projection (BART) or none (T5)
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    position: str = "relative"  # relative (T5 buckets) | learned (BART)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    pos_offset: int = 0  # learned positions (BART: 2)
    embed_norm: bool = False  # LayerNorm on the embeddings (BART's layernorm_embedding)
    final_norm: bool = True  # a norm after each stack's last block (T5; not BART)
    scale_embeddings: bool = False  # multiply embeddings by sqrt(d_model) (BART's scale_embedding)
    tie_embeddings: bool = True
    scale_output: bool = True  # decoder output * d_model**-0.5 before the LM head (T5 v1.0's, with tied head)
    logits_bias: bool = False  # BART's final_logits_bias (a saved, untrained buffer)
    attn_scale: float = 1.0  # T5 folds 1/sqrt(head_dim) into its init: 1.0; 0: 1/sqrt(head_dim) (BART)

    def __post_init__(self):
        super().__post_init__()
        if self.position not in ("relative", "learned"):
            raise ValueError(f"position={self.position!r}: choose relative or learned")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    # T5 (Raffel et al. 2020) and T5 v1.1 / mT5 (Xue et al. 2021), sized as Google's released checkpoints.
    @classmethod
    def tiny(cls, **kw) -> T5Config:
        fields = dict(vocab_size=4096, d_model=128, num_layers=2, num_heads=4, head_dim=32, d_ff=512, dropout=0.0)
        return cls(**{**fields, **kw})


def _sizes(d_model, num_layers, num_heads, head_dim, d_ff):
    return dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads, head_dim=head_dim, d_ff=d_ff)


# v1.1 and mT5: gated GELU, untied output projection without the rescale, no dropout in pretraining.
_V1_1 = dict(activation="gelu_tanh", gated_mlp=True, tie_embeddings=False, scale_output=False, dropout=0.0)
_MT5 = dict(_V1_1, vocab_size=250112)
# Switch Transformers (Fedus et al. 2022; Google's released checkpoints): T5 v1.0's base / large blocks,
# every other feed-forward layer of both stacks E experts of d_ff, top-1, the router probability scaling
# the expert (not renormalised), capacity factor 1.25 per sequence, router jitter 0.01, load-balancing
# weight 0.01 and no z-loss (that came with ST-MoE).
_SWITCH = dict(num_experts=8, experts_per_token=1, moe_every=2, router_renormalize=False, router_jitter=0.01)
_SWITCH.update(moe_dispatch="capacity", capacity_factor=1.25, moe_group_size=-1, moe_lb_weight=0.01, moe_z_weight=0.0)
T5_PRESETS = {
    "small": _sizes(512, 6, 8, 64, 2048),
    "base": _sizes(768, 12, 12, 64, 3072),
    "large": _sizes(1024, 24, 16, 64, 4096),
    "t5_3b": _sizes(1024, 24, 32, 128, 16384),
    "t5_11b": _sizes(1024, 24, 128, 128, 65536),
    "v1_1_small": dict(_V1_1, **_sizes(512, 8, 6, 64, 1024)),
    "v1_1_base": dict(_V1_1, **_sizes(768, 12, 12, 64, 2048)),
    "v1_1_large": dict(_V1_1, **_sizes(1024, 24, 16, 64, 2816)),
    "v1_1_xl": dict(_V1_1, **_sizes(2048, 24, 32, 64, 5120)),
    "v1_1_xxl": dict(_V1_1, **_sizes(4096, 24, 64, 64, 10240)),
    "mt5_small": dict(_MT5, **_sizes(512, 8, 6, 64, 1024)),
    "mt5_base": dict(_MT5, **_sizes(768, 12, 12, 64, 2048)),
    "mt5_large": dict(_MT5, **_sizes(1024, 24, 16, 64, 2816)),
    "mt5_xl": dict(_MT5, **_sizes(2048, 24, 32, 64, 5120)),
    "mt5_xxl": dict(_MT5, **_sizes(4096, 24, 64, 64, 10240)),
    # 0.62B, 1.07B, 1.98B, 3.79B, 7.42B total, 0.22B active (T5-base); large-128: 26.3B total, 0.74B active.
    **{f"switch_base_{e}": dict(_SWITCH, num_experts=e, **_sizes(768, 12, 12, 64, 3072)) for e in (8, 16, 32, 64, 128)},
    "switch_large_128": dict(_SWITCH, num_experts=128, **_sizes(1024, 24, 16, 64, 4096)),
}


@dataclasses.dataclass(frozen=True)
class BartConfig(T5Config):
    """BART (Lewis et al. 2020): post-LayerNorm, GELU, biases, learned positions offset by 2, a LayerNorm
    on the embeddings, no final LayerNorm, tied output projection plus final_logits_bias."""

    vocab_size: int = 50265
    d_model: int = 768
    num_layers: int = 6
    num_heads: int = 12
    head_dim: int = 0
    d_ff: int = 3072
    activation: str = "gelu"
    use_bias: bool = True
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "post"
    position: str = "learned"
    max_len: int = 1024
    pos_offset: int = 2
    embed_norm: bool = True
    final_norm: bool = False
    scale_output: bool = False
    logits_bias: bool = True
    attn_scale: float = 0.0

    @classmethod
    def tiny(cls, **kw) -> BartConfig:
        fields = dict(vocab_size=4096, max_len=128, d_model=128, num_layers=2, num_heads=4, d_ff=512, dropout=0.0)
        return cls(**{**fields, **kw})

    @classmethod
    def base(cls, **kw) -> BartConfig:
        return cls(**kw)

    @classmethod
    def large(cls, **kw) -> BartConfig:
        return cls(**{**dict(d_model=1024, num_layers=12, num_heads=16, d_ff=4096), **kw})


for _name, _fields in T5_PRESETS.items():
    setattr(T5Config, _name, preset(_fields))
