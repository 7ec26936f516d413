"""transformers decoder formats (GPT-2, GPT-Neo, GPT-J, NeoX, OPT, BLOOM, LLaMA, Mixtral, Qwen3-MoE) <-> model.gpt."""

from __future__ import annotations

from podformer.model import gpt
from podformer.model.hf_common import (
    Field,
    Format,
    HFError,
    activation,
    attention,
    conv1d,
    expert_linear,
    expert_packing,
    fields_from_hf,
    fields_to_hf,
    fused_qkv,
    linear,
    mlp,
    norm,
    rope_from_hf,
    tensor,
    tied,
    training,
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


# Each format's table maps config.json <-> GPTConfig both ways; the code beside it has what is fixed or derived.
_D_FF = dict(write=lambda c: c.resolved_d_ff)  # written resolved: transformers has no "0 = 4 * d_model"
_TRAINING = (training("initializer_range", "init_std", 0.02),)
_GPT2 = (
    Field("vocab_size", "vocab_size"),
    Field("n_positions", "max_len"),
    Field("n_embd", "d_model"),
    Field("n_layer", "num_layers"),
    Field("n_head", "num_heads"),
    Field("n_inner", "d_ff", lambda hf: 4 * hf["n_embd"], **_D_FF),
    activation("activation_function", "gelu_new"),
    Field("layer_norm_epsilon", "norm_eps", 1e-5),
    training("resid_pdrop", "dropout", 0.0),
    training("attn_pdrop", "attention_dropout", 0.0),
    *_TRAINING,
)


def gpt2_config(hf: dict, sd: dict) -> GPTConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise HFError("GPT-2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
    return GPTConfig(**fields_from_hf(_GPT2, hf))


def gpt2_to_hf(cfg: GPTConfig) -> dict:
    return dict(fields_to_hf(_GPT2, cfg), tie_word_embeddings=True)


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


_GPT_NEO = (
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_len"),
    Field("hidden_size", "d_model"),
    Field("num_layers", "num_layers"),
    Field("num_heads", "num_heads"),
    Field("intermediate_size", "d_ff", lambda hf: 4 * hf["hidden_size"], **_D_FF),
    activation("activation_function", "gelu_new"),
    Field("layer_norm_epsilon", "norm_eps", 1e-5),
    Field("window_size", "window_size", 256),
    training("resid_dropout", "dropout", 0.0),
    training("attention_dropout", "attention_dropout", 0.0),
    *_TRAINING,
)


def gpt_neo_config(hf: dict, sd: dict) -> GPTConfig:
    layers = hf.get("attention_layers") or [k for kinds, n in hf["attention_types"] for _ in range(n) for k in kinds]
    return GPTConfig(
        **fields_from_hf(_GPT_NEO, hf),
        qkv_bias=False,
        attn_scale=1.0,
        attention_layers=tuple(layers) if "local" in layers else (),
    )


def gpt_neo_to_hf(cfg: GPTConfig) -> dict:
    kinds = list(cfg.attention_layers or ("global",) * cfg.num_layers)
    return dict(
        fields_to_hf(_GPT_NEO, cfg),
        attention_types=[[[k], 1] for k in kinds],
        attention_layers=kinds,
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


# GPT-2's keys, plus the rotary width.
_GPTJ = (*_GPT2, Field("rotary_dim", "rotary_dim", 0, write=lambda c: c.rotary_dim or c.resolved_head_dim))


def gptj_config(hf: dict, sd: dict) -> GPTConfig:
    return GPTConfig(
        **fields_from_hf(_GPTJ, hf),
        qkv_bias=False,
        attn_out_bias=False,
        parallel_block=True,
        position="rotary",
        rotary_interleaved=True,
        tie_embeddings=False,
        lm_head_bias=True,
    )


def gptj_to_hf(cfg: GPTConfig) -> dict:
    return dict(fields_to_hf(_GPTJ, cfg), tie_word_embeddings=False)


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


_GPT_NEOX = (
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_len", 2048),
    Field("hidden_size", "d_model"),
    Field("num_hidden_layers", "num_layers"),
    Field("num_attention_heads", "num_heads"),
    Field("intermediate_size", "d_ff", **_D_FF),
    activation("hidden_act", "gelu"),
    Field("layer_norm_eps", "norm_eps", 1e-5),
    Field("attention_bias", "qkv_bias", True),
    Field("use_parallel_residual", "parallel_block", True),
    training("hidden_dropout", "dropout", 0.0),
    training("attention_dropout", "attention_dropout", 0.0),
    *_TRAINING,
)


def gpt_neox_config(hf: dict, sd: dict) -> GPTConfig:
    theta, pct = rope_from_hf(hf, theta_key="rotary_emb_base", factor_key="rotary_pct", default_factor=0.25)
    K = hf["hidden_size"] // hf["num_attention_heads"]
    fields = fields_from_hf(_GPT_NEOX, hf)
    return GPTConfig(
        **fields,
        attn_out_bias=fields["qkv_bias"],  # one switch for all attention biases
        shared_parallel_norm=False,
        position="rotary",
        rotary_dim=int(K * pct),
        rotary_base=theta,
        tie_embeddings=tied(hf, sd, "embed_out.weight", "gpt_neox.embed_in.weight", False),
    )


def gpt_neox_to_hf(cfg: GPTConfig) -> dict:
    K = cfg.resolved_head_dim
    return dict(
        fields_to_hf(_GPT_NEOX, cfg),
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


_OPT = (
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_len"),
    Field("hidden_size", "d_model"),
    Field("num_hidden_layers", "num_layers"),
    Field("num_attention_heads", "num_heads"),
    Field("ffn_dim", "d_ff", **_D_FF),
    activation("activation_function", "relu"),
    Field("enable_bias", "qkv_bias", True),
    training("dropout", "dropout", 0.0),
    training("attention_dropout", "attention_dropout", 0.0),
    training("init_std", "init_std", 0.02),
)


def opt_config(hf: dict, sd: dict) -> GPTConfig:
    D = hf["hidden_size"]
    if not hf.get("do_layer_norm_before", True) or hf.get("word_embed_proj_dim", D) != D:
        raise HFError("OPT with post-LayerNorm or a projected embedding (OPT-350m) is not supported")
    if not hf.get("layer_norm_elementwise_affine", True) or hf.get("_remove_final_layer_norm"):
        raise HFError("OPT without LayerNorm parameters or without the final LayerNorm is not supported")
    fields = fields_from_hf(_OPT, hf)
    return GPTConfig(
        **fields,
        attn_out_bias=fields["qkv_bias"],  # one switch for every bias
        mlp_bias=fields["qkv_bias"],
        pos_offset=2,
        positions_from_mask=True,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "model.decoder.embed_tokens.weight", True),
    )


def opt_to_hf(cfg: GPTConfig) -> dict:
    return dict(
        fields_to_hf(_OPT, cfg),
        word_embed_proj_dim=cfg.d_model,
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


_BLOOM = (
    Field("vocab_size", "vocab_size"),
    Field("seq_length", "max_len", 2048),
    Field("hidden_size", "d_model", lambda hf: hf["n_embed"]),  # older configs: n_embed
    Field("n_layer", "num_layers"),
    Field("n_head", "num_heads"),
    Field("layer_norm_epsilon", "norm_eps", 1e-5),
    training("hidden_dropout", "dropout", 0.0),
    training("attention_dropout", "attention_dropout", 0.0),
    *_TRAINING,
)


def bloom_config(hf: dict, sd: dict) -> GPTConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise HFError("BLOOM with apply_residual_connection_post_layernorm=true is not supported")
    return GPTConfig(
        **fields_from_hf(_BLOOM, hf),
        embed_norm=True,
        position="alibi",
        tie_embeddings=tied(hf, sd, "lm_head.weight", "transformer.word_embeddings.weight", True),
    )


def bloom_to_hf(cfg: GPTConfig) -> dict:
    return dict(fields_to_hf(_BLOOM, cfg), tie_word_embeddings=cfg.tie_embeddings)


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


_LLAMA = (
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_len", 2048),
    Field("hidden_size", "d_model"),
    Field("num_hidden_layers", "num_layers"),
    Field("num_attention_heads", "num_heads"),
    Field(
        "num_key_value_heads",
        "num_kv_heads",
        lambda hf: hf["num_attention_heads"],
        write=lambda c: c.num_kv_heads or c.num_heads,
    ),
    Field(
        "head_dim",
        "head_dim",
        lambda hf: hf["hidden_size"] // hf["num_attention_heads"],
        write=lambda c: c.resolved_head_dim,
    ),
    Field("intermediate_size", "d_ff", **_D_FF),
    activation("hidden_act", "silu"),
    Field("attention_bias", "qkv_bias", False),
    Field("mlp_bias", "mlp_bias", False),
    Field("rms_norm_eps", "norm_eps", 1e-6),
    training("attention_dropout", "attention_dropout", 0.0),
    *_TRAINING,
)


def llama_config(hf: dict, sd: dict) -> GPTConfig:
    theta, _ = rope_from_hf(hf)
    fields = fields_from_hf(_LLAMA, hf)
    return GPTConfig(
        **fields,
        gated_mlp=True,
        attn_out_bias=fields["qkv_bias"],  # one switch for all attention biases
        norm="rmsnorm",
        position="rotary",
        rotary_base=theta,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "model.embed_tokens.weight", False),
    )


def llama_to_hf(cfg: GPTConfig) -> dict:
    return dict(
        fields_to_hf(_LLAMA, cfg),
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base),
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _llama_stack(cfg: GPTConfig, feed_forward, *, qk_norm: bool = False) -> list:
    """LLaMA's layout (embedding, head, attention and norms of every layer), with the feed-forward rules of
    layer i from ``feed_forward(hf_prefix, our_prefix, i)``: LLaMA's MLP, Mixtral's or Qwen3-MoE's experts."""
    D, H, G, K, _ = _dims(cfg)
    rules = [tensor("model.embed_tokens.weight", "embed")] + norm("model.norm", "final_norm", bias=False)
    rules += _head(cfg, "lm_head.weight")
    for i in range(cfg.num_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        bias = dict(qkv_bias=cfg.qkv_bias, out_bias=cfg.attn_out_bias)
        rules += attention(h + "self_attn", b + "attn", names, (D, H, G, K), **bias)
        if qk_norm:
            rules += norm(h + "self_attn.q_norm", b + "attn.q_norm", bias=False)
            rules += norm(h + "self_attn.k_norm", b + "attn.k_norm", bias=False)
        rules += feed_forward(h, b, i)
        rules += norm(h + "input_layernorm", b + "attn_norm", bias=False)
        rules += norm(h + "post_attention_layernorm", b + "mlp_norm", bias=False)
    return rules


def _llama_mlp(cfg: GPTConfig, h: str, b: str) -> list:
    names = {"wg": "gate_proj", "wi": "up_proj", "wo": "down_proj"}
    return mlp(h + "mlp", b + "mlp", names, cfg.d_model, cfg.resolved_d_ff, bias=cfg.mlp_bias)


def _experts(router: str, experts: str, b: str, names: tuple[str, str, str]) -> list:
    """A sparse layer's router (E, D) <-> (D, E) and its gate, up and down expert kernels."""
    ours = ("wg", "wi", "wo")
    return [unembed(router, b + "mlp.router")] + [
        expert_linear(f"{experts}.{w}", f"{b}mlp.experts.{o}") for w, o in zip(names, ours, strict=True)
    ]


def llama_rules(cfg: GPTConfig) -> list:
    return _llama_stack(cfg, lambda h, b, i: _llama_mlp(cfg, h, b))


# ---------------------------------------------------------------------------------------------------
# Mixtral: LLaMA's block with a sparse feed-forward layer in every layer (top-2 of 8, renormalised)

_MIXTRAL = tuple(f for f in _LLAMA if f.ours not in ("qkv_bias", "mlp_bias", "d_ff")) + (
    Field("intermediate_size", "expert_d_ff"),
    Field("num_local_experts", "num_experts"),
    Field("num_experts_per_tok", "experts_per_token"),
    training("router_jitter_noise", "router_jitter", 0.0),
    training("router_aux_loss_coef", "moe_lb_weight", 0.02),
)


def mixtral_config(hf: dict, sd: dict) -> GPTConfig:
    if hf.get("sliding_window"):
        raise HFError(f"Mixtral with sliding_window={hf['sliding_window']} is not supported (set it to null)")
    theta, _ = rope_from_hf(hf)
    fields = fields_from_hf(_MIXTRAL, hf)
    return GPTConfig(
        **fields,
        d_ff=fields["expert_d_ff"],  # no dense MLP; the width a dense layer would have
        moe_every=1,
        router_renormalize=True,
        gated_mlp=True,
        qkv_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        norm="rmsnorm",
        position="rotary",
        rotary_base=theta,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "model.embed_tokens.weight", False),
    )


def mixtral_to_hf(cfg: GPTConfig) -> dict:
    if not cfg.num_experts or cfg.moe_every != 1 or cfg.shared_experts or not cfg.router_renormalize:
        raise HFError("Mixtral has a renormalised top-k mixture of experts in every layer and no shared experts")
    if cfg.expert_mlp == "plain":
        raise HFError("Mixtral's experts are gated like its dense MLP (expert_mlp=same)")
    return dict(
        fields_to_hf(_MIXTRAL, cfg),
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base),
        tie_word_embeddings=cfg.tie_embeddings,
        sliding_window=None,
    )


mixtral_pack, mixtral_unpack = expert_packing(".block_sparse_moe.experts", "w[123]")


def mixtral_rules(cfg: GPTConfig) -> list:
    def feed_forward(h, b, i):  # w1, w3, w2: gate, up, down
        return _experts(h + "block_sparse_moe.gate.weight", h + "block_sparse_moe.experts", b, ("w1", "w3", "w2"))

    return _llama_stack(cfg, feed_forward)


# ---------------------------------------------------------------------------------------------------
# Qwen3-MoE: fine-grained experts (e.g. 128 of width 768, top-8) in every decoder_sparse_step-th layer --
# the last of each period, as our moe_every -- per-head q/k RMSNorm, top-k renormalised or not
# (norm_topk_prob), dense layers of intermediate_size between the sparse ones.

_QWEN3_MOE = tuple(f for f in _LLAMA if f.ours not in ("mlp_bias",)) + (
    Field("moe_intermediate_size", "expert_d_ff"),
    # transformers 5 writes num_experts as num_local_experts; older folders have num_experts
    Field("num_local_experts", "num_experts", lambda hf: hf.get("num_experts", 128)),
    Field("num_experts_per_tok", "experts_per_token"),
    Field("decoder_sparse_step", "moe_every", 1),
    Field("norm_topk_prob", "router_renormalize", False),
    training("router_aux_loss_coef", "moe_lb_weight", 0.001),
)


def qwen3_moe_config(hf: dict, sd: dict) -> GPTConfig:
    if hf.get("mlp_only_layers"):
        raise HFError(f"Qwen3-MoE with mlp_only_layers={hf['mlp_only_layers']} is not supported (dense layers "
                      "only by decoder_sparse_step)")  # fmt: skip
    if hf.get("use_sliding_window"):
        raise HFError("Qwen3-MoE with use_sliding_window=true is not supported")
    theta, _ = rope_from_hf(hf)
    fields = fields_from_hf(_QWEN3_MOE, hf)
    if fields["num_experts"] and fields["num_layers"] % fields["moe_every"]:
        raise HFError(f"num_hidden_layers={fields['num_layers']} is no multiple of decoder_sparse_step")
    return GPTConfig(
        **fields,
        qk_norm=True,
        gated_mlp=True,
        attn_out_bias=fields["qkv_bias"],  # attention_bias: all four projections
        mlp_bias=False,
        norm="rmsnorm",
        position="rotary",
        rotary_base=theta,
        tie_embeddings=tied(hf, sd, "lm_head.weight", "model.embed_tokens.weight", False),
    )


def qwen3_moe_to_hf(cfg: GPTConfig) -> dict:
    if cfg.shared_experts or not cfg.qk_norm or cfg.qkv_bias != cfg.attn_out_bias or cfg.mlp_bias:
        raise HFError("Qwen3-MoE has q/k norms, no shared experts, one attention-bias switch and no MLP biases")
    if cfg.expert_mlp == "plain" or (cfg.moe_first and cfg.moe_every > 1):
        raise HFError("Qwen3-MoE's experts are gated, and its sparse layer is the last of each decoder_sparse_step")
    return dict(
        fields_to_hf(_QWEN3_MOE, cfg),
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rotary_base),
        tie_word_embeddings=cfg.tie_embeddings,
        mlp_only_layers=[],
        use_sliding_window=False,
        sliding_window=None,
    )


qwen3_moe_pack, qwen3_moe_unpack = expert_packing(".mlp.experts", "gate_proj|up_proj|down_proj")


def qwen3_moe_rules(cfg: GPTConfig) -> list:
    def feed_forward(h, b, i):
        if cfg.num_experts and (i + 1) % cfg.moe_every == 0:
            return _experts(h + "mlp.gate.weight", h + "mlp.experts", b, ("gate_proj", "up_proj", "down_proj"))
        return _llama_mlp(cfg, h, b)

    return _llama_stack(cfg, feed_forward, qk_norm=True)


_IGNORE = (
    r"^lm_head\.weight$",  # tied heads (lookups of the embedding)
    r"^embed_out\.weight$",
    r"\.attn\.(masked_)?bias$",  # saved causal-mask buffers of older checkpoints
    r"\.attention\.(masked_)?bias$",
    r"rotary_emb\.inv_freq$",
)
FORMATS = [
    Format(
        "gpt2",
        gpt2_config,
        gpt2_to_hf,
        gpt2_rules,
        "GPT2LMHeadModel",
        "transformer.",
        _IGNORE,
        base_model=("GPT2Model", "transformer."),
    ),
    Format(
        "gpt_neo",
        gpt_neo_config,
        gpt_neo_to_hf,
        gpt_neo_rules,
        "GPTNeoForCausalLM",
        "transformer.",
        _IGNORE,
        base_model=("GPTNeoModel", "transformer."),
    ),
    Format(
        "gptj",
        gptj_config,
        gptj_to_hf,
        gptj_rules,
        "GPTJForCausalLM",
        "transformer.",
        _IGNORE,
        base_model=("GPTJModel", "transformer."),
    ),
    Format(
        "gpt_neox",
        gpt_neox_config,
        gpt_neox_to_hf,
        gpt_neox_rules,
        "GPTNeoXForCausalLM",
        "gpt_neox.",
        _IGNORE,
        base_model=("GPTNeoXModel", "gpt_neox."),
    ),
    Format(
        "opt",
        opt_config,
        opt_to_hf,
        opt_rules,
        "OPTForCausalLM",
        "model.decoder.",
        _IGNORE,
        base_model=("OPTModel", "model."),
    ),
    Format(
        "bloom",
        bloom_config,
        bloom_to_hf,
        bloom_rules,
        "BloomForCausalLM",
        "transformer.",
        _IGNORE,
        base_model=("BloomModel", "transformer."),
    ),
    Format(
        "llama",
        llama_config,
        llama_to_hf,
        llama_rules,
        "LlamaForCausalLM",
        "model.",
        _IGNORE,
        base_model=("LlamaModel", "model."),
    ),
    Format(
        "mixtral",
        mixtral_config,
        mixtral_to_hf,
        mixtral_rules,
        "MixtralForCausalLM",
        "model.",
        _IGNORE,
        base_model=("MixtralModel", "model."),
        pack=mixtral_pack,
        unpack=mixtral_unpack,
    ),
    Format(
        "qwen3_moe",
        qwen3_moe_config,
        qwen3_moe_to_hf,
        qwen3_moe_rules,
        "Qwen3MoeForCausalLM",
        "model.",
        _IGNORE,
        base_model=("Qwen3MoeModel", "model."),
        pack=qwen3_moe_pack,
        unpack=qwen3_moe_unpack,
    ),
]
