"""transformers encoder formats (BERT, RoBERTa, DistilBERT) <-> model.bert."""

from __future__ import annotations

from podformer.model import bert
from podformer.model.hf_common import (
    Format,
    HFError,
    activation_from_hf,
    activation_to_hf,
    attention,
    linear,
    mlp,
    norm,
    tensor,
)

# The MLM head a bare base-model checkpoint (BertModel, RobertaModel) lacks: it starts from its init.
_MLM_HEAD = ("mlm_dense.kernel", "mlm_dense.bias", "mlm_norm.scale", "mlm_norm.bias", "mlm_bias.bias")


def _dims(cfg: bert.BertConfig):
    return cfg.d_model, cfg.num_heads, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff


def _common(hf: dict) -> dict:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise HFError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported (only absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise HFError("BERT-style decoders (is_decoder / add_cross_attention) are not supported")
    return dict(
        vocab_size=hf["vocab_size"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        activation=activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act"),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        pad_token_id=hf.get("pad_token_id") or 0,
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02),
    )


def _common_to_hf(cfg: bert.BertConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size,
        type_vocab_size=cfg.type_vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.d_ff,
        hidden_act=activation_to_hf(cfg.activation),
        layer_norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=True,
    )


def _layers(cfg, p: str) -> list:
    D, H, G, K, F = _dims(cfg)
    rules = []
    for i in range(cfg.num_layers):
        h, b = f"{p}encoder.layer.{i}.", f"blocks.{i}."
        names = ("self.query", "self.key", "self.value", "output.dense")
        rules += attention(h + "attention", b + "attn", names, (D, H, G, K), qkv_bias=True, out_bias=True)
        rules += norm(h + "attention.output.LayerNorm", b + "attn_norm")
        rules += [linear(h + "intermediate.dense.weight", b + "mlp.wi.kernel", (D,), (F,))]
        rules += [tensor(h + "intermediate.dense.bias", b + "mlp.wi.bias")]
        rules += [linear(h + "output.dense.weight", b + "mlp.wo.kernel", (F,), (D,))]
        rules += [tensor(h + "output.dense.bias", b + "mlp.wo.bias")]
        rules += norm(h + "output.LayerNorm", b + "mlp_norm")
    return rules


def _embeddings(cfg, p: str) -> list:
    rules = [tensor(f"{p}embeddings.word_embeddings.weight", "embed")]
    rules += [tensor(f"{p}embeddings.position_embeddings.weight", "pos_embed")]
    if cfg.type_vocab_size:
        rules += [tensor(f"{p}embeddings.token_type_embeddings.weight", "token_type_embed")]
    return rules + norm(f"{p}embeddings.LayerNorm", "embed_norm")


def _pooler(cfg, p: str) -> list:
    if not cfg.pooler:
        return []
    D = cfg.d_model
    weight = linear(f"{p}pooler.dense.weight", "pooler.kernel", (D,), (D,))
    return [weight, tensor(f"{p}pooler.dense.bias", "pooler.bias")]


def _mlm(prefix: str, dense: str, layer_norm: str, bias: str, D: int) -> list:
    return [
        linear(f"{prefix}{dense}.weight", "mlm_dense.kernel", (D,), (D,)),
        tensor(f"{prefix}{dense}.bias", "mlm_dense.bias"),
        *norm(f"{prefix}{layer_norm}", "mlm_norm"),
        tensor(f"{prefix}{bias}", "mlm_bias.bias"),
    ]


# ---------------------------------------------------------------------------------------------------
# BERT


def bert_config(hf: dict, sd: dict) -> bert.BertConfig:
    pooler, nsp = "bert.pooler.dense.weight" in sd, "cls.seq_relationship.weight" in sd
    return bert.BertConfig(max_len=hf["max_position_embeddings"], pooler=pooler, nsp_head=nsp and pooler, **_common(hf))


def bert_to_hf(cfg: bert.BertConfig) -> dict:
    if cfg.pos_offset or cfg.positions_from_pad:
        raise HFError("BERT has no position offset")
    return dict(_common_to_hf(cfg), max_position_embeddings=cfg.max_len)


def bert_rules(cfg: bert.BertConfig) -> list:
    D = cfg.d_model
    rules = _embeddings(cfg, "bert.") + _layers(cfg, "bert.") + _pooler(cfg, "bert.")
    rules += _mlm("cls.predictions.", "transform.dense", "transform.LayerNorm", "bias", D)
    if cfg.nsp_head:
        rules += [linear("cls.seq_relationship.weight", "nsp.kernel", (D,), (2,))]
        rules += [tensor("cls.seq_relationship.bias", "nsp.bias")]
    return rules


# ---------------------------------------------------------------------------------------------------
# RoBERTa: padding_idx = pad_token_id, and position p (counted over non-pad tokens) reads row pad + 1 + p.


def roberta_config(hf: dict, sd: dict) -> bert.RobertaConfig:
    pad = hf.get("pad_token_id", 1)
    return bert.RobertaConfig(
        max_len=hf["max_position_embeddings"] - pad - 1,
        pos_offset=pad + 1,
        pooler="roberta.pooler.dense.weight" in sd,
        **{**_common(hf), "pad_token_id": pad},
    )


def roberta_to_hf(cfg: bert.BertConfig) -> dict:
    if not cfg.positions_from_pad or cfg.pos_offset != cfg.pad_token_id + 1 or cfg.nsp_head:
        raise HFError("RoBERTa needs positions_from_pad, pos_offset = pad_token_id + 1 and no NSP head")
    return dict(_common_to_hf(cfg), max_position_embeddings=cfg.max_len + cfg.pos_offset)


def roberta_rules(cfg: bert.BertConfig) -> list:
    rules = _embeddings(cfg, "roberta.") + _layers(cfg, "roberta.") + _pooler(cfg, "roberta.")
    return rules + _mlm("lm_head.", "dense", "layer_norm", "bias", cfg.d_model)


# ---------------------------------------------------------------------------------------------------
# DistilBERT


def distilbert_config(hf: dict, sd: dict) -> bert.DistilBertConfig:
    # sinusoidal_pos_embds checkpoints store their (frozen) sinusoids as the table: read as learned.
    return bert.DistilBertConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf["max_position_embeddings"],
        d_model=hf["dim"],
        num_layers=hf["n_layers"],
        num_heads=hf["n_heads"],
        d_ff=hf["hidden_dim"],
        activation=activation_from_hf(hf.get("activation", "gelu"), "activation"),
        pad_token_id=hf.get("pad_token_id") or 0,
        dropout=hf.get("dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.1),
        init_std=hf.get("initializer_range", 0.02),
    )


def distilbert_to_hf(cfg: bert.BertConfig) -> dict:
    if cfg.type_vocab_size or cfg.pooler or cfg.pos_offset or cfg.norm_eps != 1e-12:
        raise HFError("DistilBERT has no token types, no pooler, no position offset and LayerNorm eps 1e-12")
    return dict(
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_len,
        dim=cfg.d_model,
        n_layers=cfg.num_layers,
        n_heads=cfg.num_heads,
        hidden_dim=cfg.d_ff,
        activation=activation_to_hf(cfg.activation),
        pad_token_id=cfg.pad_token_id,
        sinusoidal_pos_embds=False,
        tie_word_embeddings=True,
    )


def distilbert_rules(cfg: bert.BertConfig) -> list:
    D, H, G, K, F = _dims(cfg)
    p = "distilbert."
    rules = [tensor(p + "embeddings.word_embeddings.weight", "embed")]
    rules += [tensor(p + "embeddings.position_embeddings.weight", "pos_embed")]
    rules += norm(p + "embeddings.LayerNorm", "embed_norm")
    for i in range(cfg.num_layers):
        h, b = f"{p}transformer.layer.{i}.", f"blocks.{i}."
        names = ("q_lin", "k_lin", "v_lin", "out_lin")
        rules += attention(h + "attention", b + "attn", names, (D, H, G, K), qkv_bias=True, out_bias=True)
        rules += mlp(h + "ffn", b + "mlp", {"wi": "lin1", "wo": "lin2"}, D, F, bias=True)
        rules += norm(h + "sa_layer_norm", b + "attn_norm") + norm(h + "output_layer_norm", b + "mlp_norm")
    return rules + _mlm("", "vocab_transform", "vocab_layer_norm", "vocab_projector.bias", D)


def _bert_arch(cfg) -> str:
    return "BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"


# Tied decoder copies, the decoder bias alias and saved position-id buffers carry nothing of their own.
_IGNORE = (r"predictions\.decoder\.(weight|bias)$", r"lm_head\.decoder\.(weight|bias)$", r"position_ids$")

FORMATS = [
    Format("bert", bert_config, bert_to_hf, bert_rules, _bert_arch, "bert.", _IGNORE, _MLM_HEAD),
    Format(
        "roberta",
        roberta_config,
        roberta_to_hf,
        roberta_rules,
        "RobertaForMaskedLM",
        "roberta.",
        _IGNORE,
        _MLM_HEAD,
    ),
    Format(
        "distilbert",
        distilbert_config,
        distilbert_to_hf,
        distilbert_rules,
        "DistilBertForMaskedLM",
        "distilbert.",
        (r"vocab_projector\.weight$", *_IGNORE),
        _MLM_HEAD,
    ),
]
