"""transformers decoder-only formats (GPT-2, GPT-Neo, GPT-J, GPT-NeoX, OPT, BLOOM, LLaMA) <-> model.gpt."""

from __future__ import annotations

from podformer.model import gpt
from podformer.model.hf_common import (
    Format,
    HFError,
    activation_from_hf,
    activation_to_hf,
    attention,
    conv1d,
    fused_qkv,
    linear,
    mlp,
    norm,
    rope_from_hf,
    tensor,
    tied,
    unembed,
)

GPTConfig = gpt.GPTConfig


def _dims(cfg: GPTConfig):
    K = cfg.resolved_head_dim
    return cfg.d_model, cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, K, cfg.d_ff or 4 * cfg.d_model


def _head(cfg: GPTConfig, hf: str, bias: str = "") -> list:
    """The untied output projection, if any (a tied one is the embedding itself: nothing is saved)."""
    if cfg.tie_embeddings:
        return []
    return [unembed(hf, "lm_head")] + ([tensor(bias, "lm_head_bias.bias")] if cfg.lm_head_bias else [])


# ---------------------------------------------------------------------------------------------------
# GPT-2 (and the GPT-3 presets, which share its architecture)


def gpt2_config(hf: dict, sd: dict) -> GPTConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise HFError("GPT-2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf["n_positions"],
        d_model=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        activation=activation_from_hf(hf.get("activation_function", "gelu_new"), "activation_function"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        dropout=hf.get("resid_pdrop", 0.0),
        attention_dropout=hf.get("attn_pdrop", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def gpt2_to_hf(cfg: GPTConfig) -> dict:
    D, H, G, K, F = _dims(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=D,
        n_layer=cfg.num_layers,
        n_head=H,
        n_inner=F,
        activation_function=activation_to_hf(cfg.activation),
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=True,
    )


def gpt2_rules(cfg: GPTConfig) -> list:
    D, H, _, K, F = _dims(cfg)
    rules = [tensor("transformer.wte.weight", "embed"), tensor("transformer.wpe.weight", "pos_embed")]
    rules += norm("transformer.ln_f", "final_norm")
    for i in range(cfg.num_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        qkv = tuple(f"{b}attn.{n}.kernel" for n in ("query", "key", "value"))
        rules.append(fused_qkv(h + "attn.c_attn.weight", qkv, D, H, K, "blocks", bias=False))
        qkv = tuple(f"{b}attn.{n}.bias" for n in ("query", "key", "value"))
        rules.append(fused_qkv(h + "attn.c_attn.bias", qkv, D, H, K, "blocks", bias=True))
        rules += [conv1d(h + "attn.c_proj.weight", b + "attn.out.kernel", (H, K), (D,))]
        rules += [tensor(h + "attn.c_proj.bias", b + "attn.out.bias")]
        rules += [conv1d(h + "mlp.c_fc.weight", b + "mlp.wi.kernel", (D,), (F,))]
        rules += [tensor(h + "mlp.c_fc.bias", b + "mlp.wi.bias")]
        rules += [conv1d(h + "mlp.c_proj.weight", b + "mlp.wo.kernel", (F,), (D,))]
        rules += [tensor(h + "mlp.c_proj.bias", b + "mlp.wo.bias")]
        rules += norm(h + "ln_1", b + "attn_norm") + norm(h + "ln_2", b + "mlp_norm")
    return rules


# ---------------------------------------------------------------------------------------------------
# GPT-Neo


def gpt_neo_config(hf: dict, sd: dict) -> GPTConfig:
    layers = hf.get("attention_layers") or [k for kinds, n in hf["attention_types"] for _ in range(n) for k in kinds]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_layers"],
        num_heads=hf["num_heads"],
        d_ff=hf.get("intermediate_size") or 4 * hf["hidden_size"],
        activation=activation_from_hf(hf.get("activation_function", "gelu_new"), "activation_function"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=False,
        attn_scale=1.0,
        attention_layers=tuple(layers) if "local" in layers else (),
        window_size=hf.get("window_size", 256),
        dropout=hf.get("resid_dropout", 0.0),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def gpt_neo_to_hf(cfg: GPTConfig) -> dict:
    D, H, G, K, F = _dims(cfg)
    kinds = list(cfg.attention_layers or ("global",) * cfg.num_layers)
    return dict(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len,
        hidden_size=D,
        num_layers=cfg.num_layers,
        num_heads=H,
        intermediate_size=F,
        activation_function=activation_to_hf(cfg.activation),
        layer_norm_epsilon=cfg.norm_eps,
        attention_types=[[[k], 1] for k in kinds],
        attention_layers=kinds,
        window_size=cfg.window_size,
        tie_word_embeddings=True,
    )


def gpt_neo_rules(cfg: GPTConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    rules = [tensor("transformer.wte.weight", "embed"), tensor("transformer.wpe.weight", "pos_embed")]
    rules += norm("transformer.ln_f", "final_norm")
    for i in range(cfg.num_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        rules += attention(h + "attn.attention", b + "attn", names, (D, H, G, K), qkv_bias=False, out_bias=True)
        rules += mlp(h + "mlp", b + "mlp", {"wi": "c_fc", "wo": "c_proj"}, D, F, bias=True)
        rules += norm(h + "ln_1", b + "attn_norm") + norm(h + "ln_2", b + "mlp_norm")
    return rules


# ---------------------------------------------------------------------------------------------------
# GPT-J


def gptj_config(hf: dict, sd: dict) -> GPTConfig:
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf["n_positions"],
        d_model=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        activation=activation_from_hf(hf.get("activation_function", "gelu_new"), "activation_function"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        qkv_bias=False,
        attn_out_bias=False,
        parallel_block=True,
        position="rotary",
        rotary_dim=hf.get("rotary_dim") or 0,
        rotary_interleaved=True,
        tie_embeddings=False,
        lm_head_bias=True,
        dropout=hf.get("resid_pdrop", 0.0),
        attention_dropout=hf.get("attn_pdrop", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def gptj_to_hf(cfg: GPTConfig) -> dict:
    D, H, G, K, F = _dims(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_len,
        n_embd=D,
        n_layer=cfg.num_layers,
        n_head=H,
        n_inner=F,
        rotary_dim=cfg.rotary_dim or K,
        activation_function=activation_to_hf(cfg.activation),
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=False,
    )


def gptj_rules(cfg: GPTConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    rules = [tensor("transformer.wte.weight", "embed")] + norm("transformer.ln_f", "final_norm")
    rules += _head(cfg, "lm_head.weight", "lm_head.bias")
    for i in range(cfg.num_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        rules += attention(h + "attn", b + "attn", names, (D, H, G, K), qkv_bias=False, out_bias=False)
        rules += mlp(h + "mlp", b + "mlp", {"wi": "fc_in", "wo": "fc_out"}, D, F, bias=True)
        rules += norm(h + "ln_1", b + "attn_norm")
    return rules


# ---------------------------------------------------------------------------------------------------
# GPT-NeoX


def gpt_neox_config(hf: dict, sd: dict) -> GPTConfig:
    theta, pct = rope_from_hf(hf, theta_key="rotary_emb_base", factor_key="rotary_pct", default_factor=0.25)
    K = hf["hidden_size"] // hf["num_attention_heads"]
    bias = hf.get("attention_bias", True)
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        activation=activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act"),
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        qkv_bias=bias,
        attn_out_bias=bias,
        parallel_block=hf.get("use_parallel_residual", True),
        shared_parallel_norm=False,
        position="rotary",
        rotary_dim=int(K * pct),
        rotary_base=theta,
        tie_embeddings=tied(hf, sd, "embed_out.weight", "gpt_neox.embed_in.weight", False),
        dropout=hf.get("hidden_dropout", 0.0),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def gpt_neox_to_hf(cfg: GPTConfig) -> dict:
    D, H, G, K, F = _dims(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len,
        hidden_size=D,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=H,
        intermediate_size=F,
        hidden_act=activation_to_hf(cfg.activation),
        layer_norm_eps=cfg.norm_eps,
        attention_bias=cfg.qkv_bias,
        use_parallel_residual=cfg.parallel_block,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base, partial_rotary_factor=cfg.rotary_dim / K),
        tie_word_embeddings=cfg.tie_embeddings,
    )


def gpt_neox_rules(cfg: GPTConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    rules = [tensor("gpt_neox.embed_in.weight", "embed")] + norm("gpt_neox.final_layer_norm", "final_norm")
    rules += _head(cfg, "embed_out.weight")
    for i in range(cfg.num_layers):
        h, b = f"gpt_neox.layers.{i}.", f"blocks.{i}."
        names = tuple(f"{b}attn.{n}" for n in ("query", "key", "value"))
        w = h + "attention.query_key_value"
        rules.append(fused_qkv(w + ".weight", tuple(n + ".kernel" for n in names), D, H, K, "heads", bias=False))
        if cfg.qkv_bias:
            rules.append(fused_qkv(w + ".bias", tuple(n + ".bias" for n in names), D, H, K, "heads", bias=True))
        rules.append(linear(h + "attention.dense.weight", b + "attn.out.kernel", (H, K), (D,)))
        if cfg.attn_out_bias:
            rules.append(tensor(h + "attention.dense.bias", b + "attn.out.bias"))
        rules += mlp(h + "mlp", b + "mlp", {"wi": "dense_h_to_4h", "wo": "dense_4h_to_h"}, D, F, bias=True)
        rules += norm(h + "input_layernorm", b + "attn_norm") + norm(h + "post_attention_layernorm", b + "mlp_norm")
    return rules


# ---------------------------------------------------------------------------------------------------
# OPT


def opt_config(hf: dict, sd: dict) -> GPTConfig:
    D = hf["hidden_size"]
    if not hf.get("do_layer_norm_before", True) or hf.get("word_embed_proj_dim", D) != D:
        raise HFError("OPT with post-LayerNorm or a projected embedding (OPT-350m) is not supported")
    if not hf.get("layer_norm_elementwise_affine", True) or hf.get("_remove_final_layer_norm"):
        raise HFError("OPT without LayerNorm parameters or without the final LayerNorm is not supported")
    bias = hf.get("enable_bias", True)
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        d_model=D,
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        d_ff=hf["ffn_dim"],
        activation=activation_from_hf(hf.get("activation_function", "relu"), "activation_function"),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bias,
        pos_offset=2,
        positions_from_mask=True,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "model.decoder.embed_tokens.weight", True),
        dropout=hf.get("dropout", 0.0),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("init_std", 0.02),
    )


def opt_to_hf(cfg: GPTConfig) -> dict:
    D, H, G, K, F = _dims(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len,
        hidden_size=D,
        word_embed_proj_dim=D,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=H,
        ffn_dim=F,
        activation_function=activation_to_hf(cfg.activation),
        enable_bias=cfg.qkv_bias,
        do_layer_norm_before=True,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def opt_rules(cfg: GPTConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    p = "model.decoder."
    rules = [tensor(p + "embed_tokens.weight", "embed"), tensor(p + "embed_positions.weight", "pos_embed")]
    rules += norm(p + "final_layer_norm", "final_norm") + _head(cfg, "lm_head.weight")
    for i in range(cfg.num_layers):
        h, b = f"{p}layers.{i}.", f"blocks.{i}."
        names = ("q_proj", "k_proj", "v_proj", "out_proj")
        bias = dict(qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias)
        rules += attention(h + "self_attn", b + "attn", names, (D, H, G, K), **bias)
        rules += mlp(h[:-1], b + "mlp", {"wi": "fc1", "wo": "fc2"}, D, F, bias=cfg.mlp_bias)
        rules += norm(h + "self_attn_layer_norm", b + "attn_norm") + norm(h + "final_layer_norm", b + "mlp_norm")
    return rules


# ---------------------------------------------------------------------------------------------------
# BLOOM


def bloom_config(hf: dict, sd: dict) -> GPTConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise HFError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    D = hf.get("hidden_size") or hf["n_embed"]
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf.get("seq_length", 2048),
        d_model=D,
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        embed_norm=True,
        position="alibi",
        tie_embeddings=tied(hf, sd, "lm_head.weight", "transformer.word_embeddings.weight", True),
        dropout=hf.get("hidden_dropout", 0.0),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def bloom_to_hf(cfg: GPTConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.max_len,
        hidden_size=cfg.d_model,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def bloom_rules(cfg: GPTConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    p = "transformer."
    rules = [tensor(p + "word_embeddings.weight", "embed")] + norm(p + "word_embeddings_layernorm", "embed_norm")
    rules += norm(p + "ln_f", "final_norm") + _head(cfg, "lm_head.weight")
    for i in range(cfg.num_layers):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        names = tuple(f"{b}attn.{n}" for n in ("query", "key", "value"))
        w = h + "self_attention.query_key_value"
        rules.append(fused_qkv(w + ".weight", tuple(n + ".kernel" for n in names), D, H, K, "heads", bias=False))
        rules.append(fused_qkv(w + ".bias", tuple(n + ".bias" for n in names), D, H, K, "heads", bias=True))
        rules.append(linear(h + "self_attention.dense.weight", b + "attn.out.kernel", (H, K), (D,)))
        rules.append(tensor(h + "self_attention.dense.bias", b + "attn.out.bias"))
        rules += mlp(h + "mlp", b + "mlp", {"wi": "dense_h_to_4h", "wo": "dense_4h_to_h"}, D, F, bias=True)
        rules += norm(h + "input_layernorm", b + "attn_norm") + norm(h + "post_attention_layernorm", b + "mlp_norm")
    return rules


# ---------------------------------------------------------------------------------------------------
# LLaMA


def llama_config(hf: dict, sd: dict) -> GPTConfig:
    theta, _ = rope_from_hf(hf)
    H = hf["num_attention_heads"]
    attn_bias = hf.get("attention_bias", False)
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=H,
        num_kv_heads=hf.get("num_key_value_heads") or H,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // H,
        d_ff=hf["intermediate_size"],
        activation=activation_from_hf(hf.get("hidden_act", "silu"), "hidden_act"),
        gated_mlp=True,
        qkv_bias=attn_bias,
        attn_out_bias=attn_bias,
        mlp_bias=hf.get("mlp_bias", False),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        position="rotary",
        rotary_base=theta,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "model.embed_tokens.weight", False),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def llama_to_hf(cfg: GPTConfig) -> dict:
    D, H, G, K, F = _dims(cfg)
    return dict(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len,
        hidden_size=D,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=H,
        num_key_value_heads=G,
        head_dim=K,
        intermediate_size=F,
        hidden_act=activation_to_hf(cfg.activation),
        attention_bias=cfg.qkv_bias,
        mlp_bias=cfg.mlp_bias,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base),
        tie_word_embeddings=cfg.tie_embeddings,
    )


def llama_rules(cfg: GPTConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    rules = [tensor("model.embed_tokens.weight", "embed")] + norm("model.norm", "final_norm", bias=False)
    rules += _head(cfg, "lm_head.weight")
    for i in range(cfg.num_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        bias = dict(qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias)
        rules += attention(h + "self_attn", b + "attn", names, (D, H, G, K), **bias)
        names = {"wg": "gate_proj", "wi": "up_proj", "wo": "down_proj"}
        rules += mlp(h + "mlp", b + "mlp", names, D, F, bias=cfg.mlp_bias)
        rules += norm(h + "input_layernorm", b + "attn_norm", bias=False)
        rules += norm(h + "post_attention_layernorm", b + "mlp_norm", bias=False)
    return rules


_IGNORE = (
    r"^lm_head\.weight$",  # tied heads (lookups of the embedding)
    r"^embed_out\.weight$",
    r"\.attn\.(masked_)?bias$",  # saved causal-mask buffers of older checkpoints
    r"\.attention\.(masked_)?bias$",
    r"rotary_emb\.inv_freq$",
)
FORMATS = [
    Format("gpt2", gpt2_config, gpt2_to_hf, gpt2_rules, "GPT2LMHeadModel", "transformer.", _IGNORE),
    Format("gpt_neo", gpt_neo_config, gpt_neo_to_hf, gpt_neo_rules, "GPTNeoForCausalLM", "transformer.", _IGNORE),
    Format("gptj", gptj_config, gptj_to_hf, gptj_rules, "GPTJForCausalLM", "transformer.", _IGNORE),
    Format("gpt_neox", gpt_neox_config, gpt_neox_to_hf, gpt_neox_rules, "GPTNeoXForCausalLM", "gpt_neox.", _IGNORE),
    Format("opt", opt_config, opt_to_hf, opt_rules, "OPTForCausalLM", "model.decoder.", _IGNORE),
    Format("bloom", bloom_config, bloom_to_hf, bloom_rules, "BloomForCausalLM", "transformer.", _IGNORE),
    Format("llama", llama_config, llama_to_hf, llama_rules, "LlamaForCausalLM", "model.", _IGNORE),
]
