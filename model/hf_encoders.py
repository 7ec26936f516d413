"""transformers encoder formats (BERT, RoBERTa, DistilBERT) <-> model.bert."""

from __future__ import annotations

from podformer.model import bert
from podformer.model.hf_common import (
    Field,
    Format,
    HFError,
    activation,
    attention,
    fields_from_hf,
    fields_to_hf,
    linear,
    mlp,
    norm,
    tensor,
    training,
)

# The MLM head a bare base-model checkpoint (BertModel, RobertaModel) lacks: it starts from its init.
_MLM_HEAD = ("mlm_dense.kernel", "mlm_dense.bias", "mlm_norm.scale", "mlm_norm.bias", "mlm_bias.bias")


def _dims(cfg: bert.BertConfig):
    return cfg.d_model, cfg.num_heads, cfg.num_heads, cfg.resolved_head_dim, cfg.d_ff


# config.json <-> BertConfig, both ways; RoBERTa's padding row defaults to 1.
_COMMON = (
    Field("vocab_size", "vocab_size"),
    Field("type_vocab_size", "type_vocab_size", 2),
    Field("hidden_size", "d_model"),
    Field("num_hidden_layers", "num_layers"),
    Field("num_attention_heads", "num_heads"),
    Field("intermediate_size", "d_ff"),
    activation("hidden_act", "gelu"),
    Field("layer_norm_eps", "norm_eps", 1e-12),
    training("hidden_dropout_prob", "dropout", 0.1),
    training("attention_probs_dropout_prob", "attention_dropout", 0.1),
    training("initializer_range", "init_std", 0.02),
)
_BERT = (*_COMMON, Field("pad_token_id", "pad_token_id", 0), Field("max_position_embeddings", "max_len"))
_ROBERTA = (*_COMMON, Field("pad_token_id", "pad_token_id", 1))


def _check(hf: dict) -> None:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise HFError(f"position_embedding_type={hf['position_embedding_type']!r} is not supported (only absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise HFError("BERT-style decoders (is_decoder / add_cross_attention) are not supported")


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
    _check(hf)
    pooler, nsp = "bert.pooler.dense.weight" in sd, "cls.seq_relationship.weight" in sd
    return bert.BertConfig(pooler=pooler, nsp_head=nsp and pooler, **fields_from_hf(_BERT, hf))


def bert_to_hf(cfg: bert.BertConfig) -> dict:
    if cfg.pos_offset or cfg.positions_from_pad:
        raise HFError("BERT has no position offset")
    return dict(fields_to_hf(_BERT, cfg), tie_word_embeddings=True)


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
    _check(hf)
    fields = fields_from_hf(_ROBERTA, hf)
    pad = fields["pad_token_id"]
    return bert.RobertaConfig(
        max_len=hf["max_position_embeddings"] - pad - 1,
        pos_offset=pad + 1,
        pooler="roberta.pooler.dense.weight" in sd,
        **fields,
    )


def roberta_to_hf(cfg: bert.BertConfig) -> dict:
    if not cfg.positions_from_pad or cfg.pos_offset != cfg.pad_token_id + 1 or cfg.nsp_head:
        raise HFError("RoBERTa needs positions_from_pad, pos_offset = pad_token_id + 1 and no NSP head")
    return dict(
        fields_to_hf(_ROBERTA, cfg), max_position_embeddings=cfg.max_len + cfg.pos_offset, tie_word_embeddings=True
    )


def roberta_rules(cfg: bert.BertConfig) -> list:
    rules = _embeddings(cfg, "roberta.") + _layers(cfg, "roberta.") + _pooler(cfg, "roberta.")
    return rules + _mlm("lm_head.", "dense", "layer_norm", "bias", cfg.d_model)


# ---------------------------------------------------------------------------------------------------
# DistilBERT


_DISTILBERT = (
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_len"),
    Field("dim", "d_model"),
    Field("n_layers", "num_layers"),
    Field("n_heads", "num_heads"),
    Field("hidden_dim", "d_ff"),
    activation("activation", "gelu"),
    Field("pad_token_id", "pad_token_id", 0),
    training("dropout", "dropout", 0.1),
    training("attention_dropout", "attention_dropout", 0.1),
    training("initializer_range", "init_std", 0.02),
)


def distilbert_config(hf: dict, sd: dict) -> bert.DistilBertConfig:
    # sinusoidal_pos_embds checkpoints store their (frozen) sinusoids as the table: read as learned.
    return bert.DistilBertConfig(**fields_from_hf(_DISTILBERT, hf))


def distilbert_to_hf(cfg: bert.BertConfig) -> dict:
    if cfg.type_vocab_size or cfg.pooler or cfg.pos_offset or cfg.norm_eps != 1e-12:
        raise HFError("DistilBERT has no token types, no pooler, no position offset and LayerNorm eps 1e-12")
    return dict(fields_to_hf(_DISTILBERT, cfg), sinusoidal_pos_embds=False, tie_word_embeddings=True)


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
    Format(
        "bert",
        bert_config,
        bert_to_hf,
        bert_rules,
        _bert_arch,
        "bert.",
        _IGNORE,
        _MLM_HEAD,
        base_model=("BertModel", "bert."),
    ),
    Format(
        "roberta",
        roberta_config,
        roberta_to_hf,
        roberta_rules,
        "RobertaForMaskedLM",
        "roberta.",
        _IGNORE,
        _MLM_HEAD,
        base_model=("RobertaModel", "roberta."),
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
        base_model=("DistilBertModel", "distilbert."),
    ),
]
