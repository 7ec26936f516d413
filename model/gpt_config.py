"""The decoder family's config and its presets (GPT-2, GPT-3, GPT-Neo, GPT-J, GPT-NeoX, OPT, BLOOM, LLaMA,
PaLM, Gopher, Chinchilla); JAX-free, for run configs. The module is model/gpt.py."""

from __future__ import annotations

import dataclasses

from podformer.model.config import ModelConfig, preset

POSITIONS = ("learned", "rotary", "alibi", "none")


@dataclasses.dataclass(frozen=True)
class GPTConfig(ModelConfig):
    vocab_size: int = 50257
    activation: str = "gelu_tanh"
    num_kv_heads: int = 0  # 0: multi-head; 1: multi-query (PaLM); else grouped-query (LLaMA-2 70B)
    gated_mlp: bool = False
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    norm: str = "layernorm"
    norm_bias: bool = True
    embed_norm: bool = False  # LayerNorm right after the token embedding (BLOOM)
    parallel_block: bool = False
    shared_parallel_norm: bool = True
    position: str = "learned"  # learned | rotary | alibi | none
    pos_offset: int = 0  # learned positions: position p reads row p + pos_offset (OPT: 2)
    positions_from_mask: bool = False  # without explicit positions, count only unpadded tokens (OPT)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (Qwen3)
    rotary_dim: int = 0  # with position='rotary'; 0: the whole head
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False
    attn_scale: float = 0.0  # 0: 1/sqrt(head_dim)
    # Per-layer attention kind, 'global' or 'local' (a causal window of window_size keys); () = all global.
    attention_layers: tuple[str, ...] = ()
    window_size: int = 256
    tie_embeddings: bool = True
    lm_head_bias: bool = False  # GPT-J's output projection has a bias

    def __post_init__(self):
        super().__post_init__()
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.position not in POSITIONS:
            raise ValueError(f"position={self.position!r}: choose one of {', '.join(POSITIONS)}")
        object.__setattr__(self, "attention_layers", tuple(self.attention_layers))  # configs may hand a list
        if self.attention_layers and (
            len(self.attention_layers) != self.num_layers or set(self.attention_layers) - {"global", "local"}
        ):
            raise ValueError(f"attention_layers needs num_layers={self.num_layers} entries of 'global' or 'local'")

    @classmethod
    def tiny(cls, **kw) -> GPTConfig:
        return cls(**{**dict(vocab_size=4096, max_len=128, d_model=128, num_layers=4, num_heads=4), **kw})


# The families' shared settings, then each preset's sizes: (layers, d_model, heads, extra fields).
_GPT3 = dict(max_len=2048)
# GPT-Neo: alternating global and local (256-token window) attention, no attention scaling, no q/k/v bias.
_NEO = dict(max_len=2048, attn_scale=1.0, qkv_bias=False, window_size=256)
_OPT = dict(vocab_size=50272, max_len=2048, activation="relu", pos_offset=2, positions_from_mask=True)
_BLOOM = dict(vocab_size=250880, max_len=2048, position="alibi", embed_norm=True)
_ROPE = dict(position="rotary", norm="rmsnorm", activation="silu", gated_mlp=True, tie_embeddings=False)
_NOBIAS = dict(qkv_bias=False, attn_out_bias=False, mlp_bias=False)
_LLAMA = dict(vocab_size=32000, max_len=2048, norm_eps=1e-6, **_ROPE, **_NOBIAS)
# PaLM: SwiGLU, parallel block, multi-query attention, rotary, shared input/output embedding, "no biases
# in any of the dense kernels or layer norms".
_PALM = dict(vocab_size=256000, max_len=2048, num_kv_heads=1, head_dim=256, parallel_block=True, norm_bias=False)
_PALM.update(position="rotary", activation="silu", gated_mlp=True, **_NOBIAS)
# Gopher / Chinchilla: RMSNorm and Transformer-XL relative positions; rotary stands in for the latter here
# (its per-layer d_model x d_model position projection is not modelled, ~7% of the published totals).
# Tied embeddings: the papers' parameter totals add up with one 32k table, not two.
_DEEPMIND = dict(vocab_size=32000, max_len=2048, position="rotary", norm="rmsnorm")

# GLaM (Du et al. 2022, table 4): a mixture of 64 experts, top-2 (GShard's renormalised gates, capacity
# factor 2 in training, per routing group), in every other layer, the first of each pair (the paper's figure
# 2; Praxis' GLaM layers, moe_layers=[0]); 256K vocabulary, no biases, one tied embedding. The dense layers'
# feed-forward is gated (GLU with GELU: the paper's section 4), the experts are plain two-matrix MLPs (GShard's,
# as Praxis builds them): the paper's 96.6B activated parameters of 64B/64E come out exactly with this, 8.6B
# fewer (one 8192 x 32768 matrix in each dense layer) with plain dense layers. Its per-layer relative
# position bias is stood in for by rotary.
_GLAM = dict(vocab_size=256000, max_len=1024, position="rotary", norm="rmsnorm", activation="gelu", **_NOBIAS)
_GLAM.update(num_experts=64, experts_per_token=2, moe_every=2, moe_dispatch="capacity", capacity_factor=2.0)
_GLAM.update(gated_mlp=True, expert_mlp="plain", moe_first=True)
_GLAM.update(moe_group_size=-1)  # GShard's groups: each sequence routes on its own (its capacity, its devices)
# Mixtral (Jiang et al. 2024): LLaMA's block with 8 SwiGLU experts in every layer, top-2 renormalised.
_MIXTRAL = dict(_LLAMA, norm_eps=1e-5, rotary_base=1e6, num_kv_heads=8, num_experts=8, experts_per_token=2)
# Qwen3-MoE (Qwen team 2025; the released configs): fine-grained experts -- 128 SwiGLU experts of a small
# width, top-8 renormalised (norm_topk_prob) -- in every layer, per-head q/k RMSNorm, GQA with 4 kv heads.
_QWEN3_MOE = dict(_LLAMA, vocab_size=151936, max_len=40960, rotary_base=1e6, qk_norm=True, num_kv_heads=4)
_QWEN3_MOE.update(head_dim=128, num_experts=128, experts_per_token=8, moe_lb_weight=0.001)

PRESETS: dict[str, dict] = {
    # GPT-2 (Radford et al. 2019; OpenAI's released checkpoints).
    "gpt2_small": dict(),
    "gpt2_medium": dict(d_model=1024, num_layers=24, num_heads=16),
    "gpt2_large": dict(d_model=1280, num_layers=36, num_heads=20),
    "gpt2_xl": dict(d_model=1600, num_layers=48, num_heads=25),
    # GPT-3 (Brown et al. 2020, table 2.1): the GPT-2 architecture at 2048 tokens. GPT-3 alternated dense and
    # locally banded sparse attention layers; these presets use dense attention in every layer. The table's
    # 1.3B (24 heads of 128 in a 2048 model) and 13B (d_model 5140 over 40 heads of 128) are inconsistent
    # with their own totals; 16 heads and d_model 5120 are what the totals and re-implementations use.
    "gpt3_125m": dict(_GPT3, d_model=768, num_layers=12, num_heads=12),
    "gpt3_350m": dict(_GPT3, d_model=1024, num_layers=24, num_heads=16),
    "gpt3_760m": dict(_GPT3, d_model=1536, num_layers=24, num_heads=16),
    "gpt3_1_3b": dict(_GPT3, d_model=2048, num_layers=24, num_heads=16),
    "gpt3_2_7b": dict(_GPT3, d_model=2560, num_layers=32, num_heads=32),
    "gpt3_6_7b": dict(_GPT3, d_model=4096, num_layers=32, num_heads=32),
    "gpt3_13b": dict(_GPT3, d_model=5120, num_layers=40, num_heads=40),
    "gpt3_175b": dict(_GPT3, d_model=12288, num_layers=96, num_heads=96),
    # Megatron-Turing NLG 530B (Smith et al. 2022, section 3.1): the GPT-3 architecture, wider and deeper.
    "mt_nlg_530b": dict(_GPT3, d_model=20480, num_layers=105, num_heads=128),
    # GPT-Neo (EleutherAI).
    "gpt_neo_125m": dict(_NEO, d_model=768, num_layers=12, num_heads=12, attention_layers=("global", "local") * 6),
    "gpt_neo_1_3b": dict(_NEO, d_model=2048, num_layers=24, num_heads=16, attention_layers=("global", "local") * 12),
    "gpt_neo_2_7b": dict(_NEO, d_model=2560, num_layers=32, num_heads=20, attention_layers=("global", "local") * 16),
    # GPT-J 6B: rotary on 64 of 256 head dims (pairs interleaved), one LayerNorm feeding attention and MLP in
    # parallel, no attention biases, untied output projection with a bias.
    "gptj_6b": dict(
        vocab_size=50400,
        max_len=2048,
        d_model=4096,
        num_layers=28,
        num_heads=16,
        position="rotary",
        rotary_dim=64,
        rotary_interleaved=True,
        parallel_block=True,
        qkv_bias=False,
        attn_out_bias=False,
        tie_embeddings=False,
        lm_head_bias=True,
    ),  # fmt: skip
    # GPT-NeoX 20B: rotary on a quarter of each head (halves), parallel residual with two LayerNorms.
    "gpt_neox_20b": dict(
        vocab_size=50432,
        max_len=2048,
        d_model=6144,
        num_layers=44,
        num_heads=64,
        activation="gelu",
        position="rotary",
        rotary_dim=24,
        parallel_block=True,
        shared_parallel_norm=False,
        tie_embeddings=False,
    ),  # fmt: skip
    # OPT (Zhang et al. 2022): ReLU, learned positions offset by 2. (OPT-350m is post-LayerNorm with a
    # projected embedding, a different architecture, and has no preset.)
    "opt_125m": dict(_OPT, d_model=768, num_layers=12, num_heads=12),
    "opt_1_3b": dict(_OPT, d_model=2048, num_layers=24, num_heads=32),
    "opt_2_7b": dict(_OPT, d_model=2560, num_layers=32, num_heads=32),
    "opt_6_7b": dict(_OPT, d_model=4096, num_layers=32, num_heads=32),
    "opt_13b": dict(_OPT, d_model=5120, num_layers=40, num_heads=40),
    "opt_30b": dict(_OPT, d_model=7168, num_layers=48, num_heads=56),
    "opt_66b": dict(_OPT, d_model=9216, num_layers=64, num_heads=72),
    "opt_175b": dict(_OPT, d_model=12288, num_layers=96, num_heads=96),
    # BLOOM (BigScience 2022): ALiBi, LayerNorm on the embedding.
    "bloom_560m": dict(_BLOOM, d_model=1024, num_layers=24, num_heads=16),
    "bloom_1b1": dict(_BLOOM, d_model=1536, num_layers=24, num_heads=16),
    "bloom_1b7": dict(_BLOOM, d_model=2048, num_layers=24, num_heads=16),
    "bloom_3b": dict(_BLOOM, d_model=2560, num_layers=30, num_heads=32),
    "bloom_7b1": dict(_BLOOM, d_model=4096, num_layers=30, num_heads=32),
    "bloom_176b": dict(_BLOOM, d_model=14336, num_layers=70, num_heads=112),
    # LLaMA (Touvron et al. 2023): RMSNorm, SwiGLU, rotary; LLaMA-2 70B and LLaMA-3 use grouped-query attention.
    "llama_7b": dict(_LLAMA, d_model=4096, num_layers=32, num_heads=32, d_ff=11008),
    "llama_13b": dict(_LLAMA, d_model=5120, num_layers=40, num_heads=40, d_ff=13824),
    "llama_33b": dict(_LLAMA, d_model=6656, num_layers=60, num_heads=52, d_ff=17920),
    "llama_65b": dict(_LLAMA, d_model=8192, num_layers=80, num_heads=64, d_ff=22016),
    "llama2_70b": dict(
        _LLAMA, max_len=4096, norm_eps=1e-5, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8, d_ff=28672
    ),
    "llama3_8b": dict(
        _LLAMA,
        vocab_size=128256,
        max_len=8192,
        norm_eps=1e-5,
        rotary_base=500000.0,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        d_ff=14336,
    ),  # fmt: skip
    # PaLM (Chowdhery et al. 2022, table 1): d_ff = 4 d_model.
    "palm_8b": dict(_PALM, d_model=4096, num_layers=32, num_heads=16),
    "palm_62b": dict(_PALM, d_model=8192, num_layers=64, num_heads=32),
    "palm_540b": dict(_PALM, d_model=18432, num_layers=118, num_heads=48),
    # Gopher (Rae et al. 2021, table 1) and Chinchilla (Hoffmann et al. 2022, table 4): heads of 128.
    "gopher_7b": dict(_DEEPMIND, d_model=4096, num_layers=32, num_heads=32),
    "gopher_280b": dict(_DEEPMIND, d_model=16384, num_layers=80, num_heads=128),
    "chinchilla_70b": dict(_DEEPMIND, d_model=8192, num_layers=80, num_heads=64),
    # GLaM (0.1B/64E ... 64B/64E): named by their dense-equivalent (active) size.
    "glam_0_1b_64e": dict(_GLAM, d_model=768, num_layers=12, num_heads=12, d_ff=3072),
    "glam_1_7b_64e": dict(_GLAM, d_model=2048, num_layers=24, num_heads=16, head_dim=128, d_ff=8192),
    "glam_8b_64e": dict(_GLAM, d_model=4096, num_layers=32, num_heads=32, head_dim=128, d_ff=16384),
    "glam_64b_64e": dict(_GLAM, d_model=8192, num_layers=64, num_heads=128, head_dim=128, d_ff=32768),
    # Mixtral 8x7B and 8x22B (mistralai's released configs): 46.7B / 12.9B and 141B / 39B total / active.
    "mixtral_8x7b": dict(
        _MIXTRAL, max_len=32768, d_model=4096, num_layers=32, num_heads=32, d_ff=14336, expert_d_ff=14336
    ),
    "mixtral_8x22b": dict(
        _MIXTRAL,
        vocab_size=32768,
        max_len=65536,
        d_model=6144,
        num_layers=56,
        num_heads=48,
        d_ff=16384,
        expert_d_ff=16384,
    ),  # fmt: skip
    # Qwen3-30B-A3B and Qwen3-235B-A22B: 30.5B / 3.3B and 235B / 22B total / active.
    "qwen3_moe_30b_a3b": dict(
        _QWEN3_MOE, d_model=2048, num_layers=48, num_heads=32, d_ff=6144, expert_d_ff=768
    ),  # fmt: skip
    "qwen3_moe_235b_a22b": dict(
        _QWEN3_MOE, d_model=4096, num_layers=94, num_heads=64, d_ff=12288, expert_d_ff=1536
    ),  # fmt: skip
}


for _name, _fields in PRESETS.items():
    setattr(GPTConfig, _name, preset(_fields))
