"""transformers encoder-decoder formats (T5 v1.0 / v1.1, mT5, Switch Transformers, BART) <-> model.t5."""

from __future__ import annotations

import dataclasses

from podformer.model import t5
from podformer.model.hf_common import (
    Field,
    Format,
    HFError,
    activation,
    activation_from_hf,
    activation_to_hf,
    attention,
    expert_linear,
    expert_packing,
    fields_from_hf,
    fields_to_hf,
    mlp,
    norm,
    tensor,
    tied,
    training,
    unembed,
)

# ---------------------------------------------------------------------------------------------------
# T5 and mT5


# config.json <-> T5Config, both ways (the MLP's kind and activation are one key: see _t5_common).
_T5 = (
    Field("vocab_size", "vocab_size"),
    Field("d_model", "d_model"),
    Field("num_layers", "num_layers"),
    Field("num_decoder_layers", "num_decoder_layers", lambda hf: hf["num_layers"], write=lambda c: c.decoder_layers),
    Field("num_heads", "num_heads"),
    Field("d_kv", "head_dim", write=lambda c: c.resolved_head_dim),
    Field("d_ff", "d_ff"),
    Field("layer_norm_epsilon", "norm_eps", 1e-6),
    Field("relative_attention_num_buckets", "relative_buckets", 32),
    Field("relative_attention_max_distance", "relative_max_distance", 128),
    training("dropout_rate", "dropout", 0.1),
    training("initializer_factor", "init_std", 1.0, lambda v: v * 0.02),
)


def _t5_common(hf: dict, sd: dict) -> dict:
    proj = hf.get("feed_forward_proj", "relu").split("-")
    gated = proj[0] == "gated"
    # transformers maps 'gated-gelu' to the tanh GELU ('gelu_new'); any other name is taken as written.
    act = "gelu_new" if hf.get("feed_forward_proj") == "gated-gelu" else proj[-1]
    return dict(
        fields_from_hf(_T5, hf),
        activation=activation_from_hf(act, "feed_forward_proj"),
        gated_mlp=gated,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "shared.weight", True),
    )


def t5_config(hf: dict, sd: dict) -> t5.T5Config:
    c = _t5_common(hf, sd)
    # The d_model**-0.5 rescale before the LM head is T5 v1.0's (whose head is the tied embedding);
    # transformers 5 records it as scale_decoder_outputs, earlier versions inferred it from
    # tie_word_embeddings (false in the v1.1 checkpoints).
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    return t5.T5Config(**c, scale_output=bool(scale))


def mt5_config(hf: dict, sd: dict) -> t5.T5Config:
    return t5.T5Config(**_t5_common(hf, sd), scale_output=False)  # transformers' mT5 never rescales


def t5_to_hf(cfg: t5.T5Config) -> dict:
    if cfg.position != "relative" or cfg.norm != "rmsnorm" or cfg.norm_position != "pre" or cfg.use_bias:
        raise HFError("T5 is pre-RMSNorm with relative positions and no biases")
    if cfg.embed_norm or not cfg.final_norm or cfg.scale_embeddings or cfg.logits_bias or cfg.attn_scale != 1.0:
        raise HFError("T5 has a final norm and no embedding norm, embedding scale, logits bias or attention scale")
    act = activation_to_hf(cfg.activation)
    if cfg.gated_mlp:
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"
    else:
        proj = act
    return dict(
        fields_to_hf(_T5, cfg),
        feed_forward_proj=proj,
        tie_word_embeddings=cfg.tie_embeddings,
        scale_decoder_outputs=cfg.scale_output,
    )


def mt5_to_hf(cfg: t5.T5Config) -> dict:
    if cfg.scale_output:
        raise HFError("transformers' mT5 never rescales the decoder output")
    out = t5_to_hf(cfg)
    del out["scale_decoder_outputs"]
    return out


def _t5_stack(cfg: t5.T5Config, side: str, num_layers: int) -> list:
    D, H, K, F = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff
    qkvo = ("q", "k", "v", "o")
    ff = {"wg": "wi_0", "wi": "wi_1", "wo": "wo"} if cfg.gated_mlp else {"wi": "wi", "wo": "wo"}
    rules = [tensor(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{side}.rel_bias.table")]
    rules += norm(f"{side}.final_layer_norm", f"{side}.final_norm", bias=False)
    for i in range(num_layers):
        h, b = f"{side}.block.{i}.layer.", f"{side}.blocks.{i}."
        rules += attention(h + "0.SelfAttention", b + "attn", qkvo, (D, H, H, K), qkv_bias=False, out_bias=False)
        rules += norm(h + "0.layer_norm", b + "attn_norm", bias=False)
        j = 1
        if side == "decoder":
            rules += attention(h + "1.EncDecAttention", b + "cross", qkvo, (D, H, H, K), qkv_bias=False, out_bias=False)
            rules += norm(h + "1.layer_norm", b + "cross_norm", bias=False)
            j = 2
        rules += mlp(f"{h}{j}.DenseReluDense", b + "mlp", ff, D, F, bias=False)
        rules += norm(f"{h}{j}.layer_norm", b + "mlp_norm", bias=False)
    return rules


def t5_rules(cfg: t5.T5Config) -> list:
    rules = [tensor("shared.weight", "embed")] + ([] if cfg.tie_embeddings else [unembed("lm_head.weight", "lm_head")])
    return rules + _t5_stack(cfg, "encoder", cfg.num_layers) + _t5_stack(cfg, "decoder", cfg.decoder_layers)


# ---------------------------------------------------------------------------------------------------
# Switch Transformers (Fedus et al. 2022): T5 v1.0's blocks, every other feed-forward layer of both stacks a
# top-1 mixture of experts whose output is scaled by the router's probability (not renormalised). Each
# sequence routes on its own: in token order, an expert takes at most expert_capacity of its tokens, the
# rest pass through the residual -- in transformers at evaluation too; podformer's capacity dispatch with
# one group per sequence (moe_group_size=-1) is that rule.

_SWITCH = tuple(f for f in _T5 if f.ours not in ("dropout", "init_std")) + (
    activation("dense_act_fn", "relu"),
    Field("num_experts", "num_experts"),
    # capacity_factor-based routing (expert_capacity 0) has no transformers equivalent: exported with room
    # for every token of a max_len sequence, so nothing drops there
    Field("expert_capacity", "expert_capacity", 64, write=lambda c: c.expert_capacity or c.max_len),
    training("dropout_rate", "dropout", 0.1),
    training("initializer_factor", "init_std", 1.0, lambda v: v * 0.02),
    training("router_jitter_noise", "router_jitter", 0.01),
    training("router_aux_loss_coef", "moe_lb_weight", 0.001),
    training("router_z_loss_coef", "moe_z_weight", 0.001),
)


def _sparse_step(hf: dict, layers: int, side: str) -> int:
    """transformers: layers // num_sparse_<side>_layers, layer i sparse when i % step == 1 (every layer when
    1): with step 2, layers 1, 3, 5, ..., the last of each period as podformer's moe_every."""
    sparse = hf.get(f"num_sparse_{side}_layers", 3)
    step = layers // sparse if sparse else 0
    if step not in (1, 2) or step * sparse != layers:
        raise HFError(f"Switch Transformers with {sparse} sparse of {layers} {side} layers is not supported "
                      "(every layer or every other layer)")  # fmt: skip
    return step


def switch_config(hf: dict, sd: dict) -> t5.T5Config:
    if hf.get("router_bias"):
        raise HFError("Switch Transformers with router_bias=true is not supported")
    fields = fields_from_hf(_SWITCH, hf)
    step = _sparse_step(hf, fields["num_layers"], "encoder")
    if _sparse_step(hf, fields["num_decoder_layers"], "decoder") != step:
        raise HFError("Switch Transformers with different sparse steps in the encoder and decoder is not supported")
    tie = tied(hf, sd, "lm_head.weight", "shared.weight", True)
    return t5.T5Config(
        **fields,
        moe_every=step,
        experts_per_token=1,
        router_renormalize=False,
        moe_dispatch="capacity",
        moe_group_size=-1,
        tie_embeddings=tie,
        scale_output=tie,  # transformers rescales the decoder output exactly when the head is tied
    )


def switch_to_hf(cfg: t5.T5Config) -> dict:
    out = t5_to_hf(dataclasses.replace(cfg, num_experts=0))  # T5's checks and fields
    if cfg.gated_mlp or cfg.experts_per_token != 1 or cfg.router_renormalize or cfg.moe_every not in (1, 2):
        raise HFError("Switch Transformers has plain MLPs and a top-1 router in every or every other layer")
    if cfg.expert_mlp == "gated" or (cfg.moe_first and cfg.moe_every > 1):
        raise HFError("Switch Transformers' experts are plain, and its sparse layers are 1, 3, 5, ... (not moe_first)")
    if cfg.shared_experts or cfg.scale_output != cfg.tie_embeddings:
        raise HFError("Switch Transformers has no shared experts and rescales the output exactly when tied")
    del out["feed_forward_proj"], out["scale_decoder_outputs"]
    return dict(
        out,
        **fields_to_hf(_SWITCH, cfg),
        num_sparse_encoder_layers=cfg.num_layers // cfg.moe_every,
        num_sparse_decoder_layers=cfg.decoder_layers // cfg.moe_every,
        router_bias=False,
        router_dtype="float32",
    )


switch_pack, switch_unpack = expert_packing(".mlp.experts", "wi|wo", index="expert_")


def _switch_stack(cfg: t5.T5Config, side: str, num_layers: int) -> list:
    D, F = cfg.d_model, cfg.d_ff
    rules = []
    for r in _t5_stack(cfg, side, num_layers):  # attention, norms; the feed-forward layers are Switch's own
        if ".DenseReluDense." not in r.hf:
            rules.append(r)
    for i in range(num_layers):
        j = 2 if side == "decoder" else 1
        h, b = f"{side}.block.{i}.layer.{j}.", f"{side}.blocks.{i}."
        rules += norm(h + "layer_norm", b + "mlp_norm", bias=False)
        if (i + 1) % cfg.moe_every == 0:
            rules.append(unembed(h + "mlp.router.classifier.weight", b + "mlp.router"))  # (E, D) <-> (D, E)
            rules += [expert_linear(f"{h}mlp.experts.{w}", f"{b}mlp.experts.{w}") for w in ("wi", "wo")]
        else:
            rules += mlp(h + "mlp", b + "mlp", {"wi": "wi", "wo": "wo"}, D, F, bias=False)
    return rules


def switch_rules(cfg: t5.T5Config) -> list:
    rules = [tensor("shared.weight", "embed")] + ([] if cfg.tie_embeddings else [unembed("lm_head.weight", "lm_head")])
    return rules + _switch_stack(cfg, "encoder", cfg.num_layers) + _switch_stack(cfg, "decoder", cfg.decoder_layers)


# ---------------------------------------------------------------------------------------------------
# BART


# config.json <-> BartConfig, both ways.
_BART = (
    Field("vocab_size", "vocab_size"),
    Field("d_model", "d_model"),
    Field("encoder_layers", "num_layers"),
    Field("decoder_layers", "num_decoder_layers", write=lambda c: c.decoder_layers),
    Field("encoder_attention_heads", "num_heads"),
    Field("encoder_ffn_dim", "d_ff"),
    activation("activation_function", "gelu"),
    Field("max_position_embeddings", "max_len"),
    Field("scale_embedding", "scale_embeddings", False, bool),
    training("dropout", "dropout", 0.1),
    training("attention_dropout", "attention_dropout", 0.0),
    training("init_std", "init_std", 0.02),
)


def bart_config(hf: dict, sd: dict) -> t5.BartConfig:
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(a) != hf.get(b):
            raise HFError(f"BART with {a}={hf.get(a)} != {b}={hf.get(b)} is not supported")
    if hf.get("normalize_before") or hf.get("add_final_layer_norm"):
        raise HFError("pre-LayerNorm BART variants (normalize_before / add_final_layer_norm) are not supported")
    return t5.BartConfig(**fields_from_hf(_BART, hf), logits_bias="final_logits_bias" in sd)


def bart_to_hf(cfg: t5.T5Config) -> dict:
    if cfg.position != "learned" or cfg.pos_offset != 2 or cfg.norm != "layernorm" or cfg.norm_position != "post":
        raise HFError("BART is post-LayerNorm with learned positions offset by 2")
    if not cfg.use_bias or not cfg.embed_norm or cfg.final_norm or not cfg.tie_embeddings or cfg.attn_scale:
        raise HFError("BART has biases, an embedding LayerNorm, no final norm, a tied head and 1/sqrt(K) scaling")
    # One head count and MLP width for both stacks (bart_config refuses others).
    return dict(
        fields_to_hf(_BART, cfg),
        decoder_attention_heads=cfg.num_heads,
        decoder_ffn_dim=cfg.d_ff,
        tie_word_embeddings=True,
    )


def _bart_stack(cfg: t5.T5Config, side: str, num_layers: int) -> list:
    D, H, K, F = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff
    p = f"model.{side}."
    rules = [tensor(p + "embed_positions.weight", f"{side}.pos_embed")]
    rules += norm(p + "layernorm_embedding", f"{side}.embed_norm")
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    for i in range(num_layers):
        h, b = f"{p}layers.{i}.", f"{side}.blocks.{i}."
        rules += attention(h + "self_attn", b + "attn", names, (D, H, H, K), qkv_bias=True, out_bias=True)
        rules += norm(h + "self_attn_layer_norm", b + "attn_norm")
        if side == "decoder":
            rules += attention(h + "encoder_attn", b + "cross", names, (D, H, H, K), qkv_bias=True, out_bias=True)
            rules += norm(h + "encoder_attn_layer_norm", b + "cross_norm")
        rules += mlp(h[:-1], b + "mlp", {"wi": "fc1", "wo": "fc2"}, D, F, bias=True)
        rules += norm(h + "final_layer_norm", b + "mlp_norm")
    return rules


def bart_rules(cfg: t5.T5Config) -> list:
    V = cfg.vocab_size
    rules = [tensor("model.shared.weight", "embed")]
    if cfg.logits_bias:
        rules.append(tensor("final_logits_bias", "logits_bias", (V,), (1, V)))
    return rules + _bart_stack(cfg, "encoder", cfg.num_layers) + _bart_stack(cfg, "decoder", cfg.decoder_layers)


# Tied copies of the shared embedding.
_T5_IGNORE = (r"^(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$")
_BART_IGNORE = (r"^model\.(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$")

FORMATS = [
    Format(
        "t5", t5_config, t5_to_hf, t5_rules, "T5ForConditionalGeneration", "", _T5_IGNORE, base_model=("T5Model", "")
    ),
    Format(
        "mt5",
        mt5_config,
        mt5_to_hf,
        t5_rules,
        "MT5ForConditionalGeneration",
        "",
        _T5_IGNORE,
        base_model=("MT5Model", ""),
    ),
    Format(
        "switch_transformers",
        switch_config,
        switch_to_hf,
        switch_rules,
        "SwitchTransformersForConditionalGeneration",
        "",
        _T5_IGNORE,
        base_model=("SwitchTransformersModel", ""),
        pack=switch_pack,
        unpack=switch_unpack,
    ),
    Format(
        "bart",
        bart_config,
        bart_to_hf,
        bart_rules,
        "BartForConditionalGeneration",
        "model.",
        _BART_IGNORE,
        base_model=("BartModel", "model."),
    ),
]
