"""Every full-size preset: jax.eval_shape parameter counts against transformers' own count of the same
architecture (built on torch's meta device, no memory used), or the paper's figure where transformers has
no such architecture. Also FLOPs/token for encoders and encoder-decoders."""

import pytest
from flax import nnx

from podformer import flops
from podformer.model import bert, gpt, hf, params, t5

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NOT_IN_TRANSFORMERS = ("palm", "gopher", "chinchilla", "glam")  # GLaM: tests/test_moe.py
PRESETS = (
    [(gpt.GPT, gpt.GPTConfig, p) for p in gpt.PRESETS if not p.startswith(NOT_IN_TRANSFORMERS)]
    + [(bert.Bert, bert.BertConfig, p) for p in ("base_uncased", "large_uncased", "base_cased", "large_cased")]
    + [(bert.Bert, bert.RobertaConfig, p) for p in ("base", "large")]
    + [(bert.Bert, bert.DistilBertConfig, "base")]
    + [(t5.T5, t5.T5Config, p) for p in t5.T5_PRESETS]
    + [(t5.T5, t5.BartConfig, p) for p in ("base", "large")]
)


def our_count(module_cls, cfg) -> int:
    """Over the tokenizer's vocabulary: the tables' padding rows (model/vocab.py) are no parameters of the
    published architecture (test_vocab_padding.py checks what they add)."""
    return params.count(nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0))))


def transformers_count(cfg) -> int:
    config = hf.hf_config(cfg)
    model_type, architecture = config.pop("model_type"), config.pop("architectures")[0]
    with torch.device("meta"):
        model = getattr(transformers, architecture)(transformers.AutoConfig.for_model(model_type, **config))
    n = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are counted once
    if model_type in ("t5", "mt5") and not cfg.tie_embeddings:
        # transformers 5 always ties T5's head at construction (and unties it when a checkpoint brings
        # its own, as the v1.1 and mT5 releases do): count that separate head.
        n += model.lm_head.weight.numel()
    return n


@pytest.mark.parametrize("module_cls,config_cls,preset", PRESETS, ids=[f"{c.__name__}.{p}" for _, c, p in PRESETS])
def test_preset_parameter_count_matches_transformers(module_cls, config_cls, preset):
    cfg = getattr(config_cls, preset)()
    assert our_count(module_cls, cfg) == transformers_count(cfg)


@pytest.mark.parametrize(
    "preset,published,unmodelled",
    [
        # PaLM (Chowdhery et al. 2022, table 1).
        ("palm_8b", 8.63e9, 0),
        ("palm_62b", 62.50e9, 0),
        ("palm_540b", 540.35e9, 0),
        # Gopher / Chinchilla: their Transformer-XL relative-position projections (one d_model x d_model
        # matrix per layer) are not modelled (rotary stands in); the rest must add up.
        ("gopher_7b", 7.1e9, 32 * 4096**2),
        ("gopher_280b", 280e9, 80 * 16384**2),
        ("chinchilla_70b", 70e9, 80 * 8192**2),
    ],
)
def test_presets_without_transformers_architecture_match_their_papers(preset, published, unmodelled):
    n = our_count(gpt.GPT, getattr(gpt.GPTConfig, preset)())
    assert abs(n + unmodelled - published) / published < 0.01, n


def test_flops_per_token_for_encoders_and_encoder_decoders():
    L = 128
    enc = bert.BertConfig.tiny(num_layers=3)
    sizes = {"embed": 100, "pos_embed": 7, "token_type_embed": 5, "blocks.0.attn.query.kernel": 11}
    assert flops.per_token(enc, sizes, L) == 6 * (100 + 11) + 12 * 3 * enc.num_heads * enc.resolved_head_dim * L
    s2s = t5.T5Config.tiny(num_layers=2, num_decoder_layers=3, tie_embeddings=False)
    sizes = {"embed": 100, "lm_head": 100, "encoder.rel_bias.table": 9, "decoder.blocks.0.mlp.wi.kernel": 13}
    # Untied: the input embedding is a lookup; the decoder layers attend twice (self and cross).
    expected = 6 * (100 + 13) + 12 * (2 + 2 * 3) * s2s.num_heads * s2s.head_dim * L
    assert flops.per_token(s2s, sizes, L) == expected
    # Span corruption: decoder rows of 32 for encoder rows of 128. The encoder's matmuls run on 128
    # positions, the decoder's and the output projection on 32; per encoder position.
    D = 32
    attention = 12 * s2s.num_heads * s2s.head_dim * (2 * L * L + 3 * (D * D + D * L))
    assert flops.per_token(s2s, sizes, L, decoder_len=D) == (6 * (100 * D + 13 * D) + attention) / L
    sizes["encoder.blocks.0.mlp.wi.kernel"] = 17
    assert flops.per_token(s2s, sizes, L, decoder_len=D) == (6 * (17 * L + 113 * D) + attention) / L


def test_full_size_configs_read_their_papers_datasets():
    """The tiny variants train on the embedded corpus; the full-size ones on the TFDS dataset closest to
    their paper's (BERT: Wikipedia; T5: C4; RoBERTa/BART: C4 for their web-text mix)."""
    from podformer.configs import bart, bert, distilbert, roberta, t5

    expected = {
        (bert, "base_uncased"): "wikipedia/20230601.en",
        (distilbert, "base"): "wikipedia/20230601.en",
        (roberta, "base"): "c4/en:3.1.0",
        (bart, "base"): "c4/en:3.1.0",
        (t5, "small"): "c4/en:3.1.0",
    }
    for (module, variant), name in expected.items():
        c = module.get_config(variant)
        assert (c.data.source, c.data.tfds_name) == ("tfds", name), (module.__name__, variant)
        assert module.get_config("tiny").data.source == "embedded"


MOE_PRESETS = [(gpt.GPT, gpt.GPTConfig, p) for p in gpt.PRESETS if p.startswith(("mixtral", "qwen3_moe"))]
MOE_PRESETS += [(t5.T5, t5.T5Config, p) for p in t5.T5_PRESETS if p.startswith("switch")]


@pytest.mark.parametrize("module_cls,config_cls,preset", MOE_PRESETS, ids=[p for _, _, p in MOE_PRESETS])
def test_moe_preset_active_parameters_match_transformers(module_cls, config_cls, preset):
    """Active per token: transformers' parameters with each expert module's counted at experts_per_token /
    num_experts (its routers in full), the same architecture on the meta device."""
    cfg = getattr(config_cls, preset)()
    config = hf.hf_config(cfg)
    model_type, architecture = config.pop("model_type"), config.pop("architectures")[0]
    with torch.device("meta"):
        model = getattr(transformers, architecture)(transformers.AutoConfig.for_model(model_type, **config))
    share = cfg.experts_per_token / cfg.num_experts
    expected = sum(p.numel() * (share if ".experts." in name else 1) for name, p in model.named_parameters())
    ours = params.count_active(nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(0))))
    assert ours == pytest.approx(expected, rel=1e-12)
