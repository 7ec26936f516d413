"""Tiny random transformers models of every family the zoo imports, saved to folders once per session."""

from __future__ import annotations

import numpy as np

V = 97  # vocabulary of every tiny reference model
SEQ2SEQ = ("t5", "t5_v1_1", "mt5", "bart", "switch_transformers")
ENCODERS = ("bert", "bert_mlm", "roberta", "distilbert")
MOE = ("mixtral", "qwen3_moe")  # initialised with std 0.02 (Switch: router 1, experts d_model ** -0.5)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def specs(T) -> dict:
    """name -> (transformers config, model class). Sizes are tiny but every option is exercised: GQA,
    partial rotary (even dims), local layers with a window shorter than the test sequences, ..."""
    bert = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    t5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4)
    return {
        "gpt2": (T.GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=4), T.GPT2LMHeadModel),
        "gpt_neo": (
            T.GPTNeoConfig(
                vocab_size=V,
                max_position_embeddings=40,
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                attention_types=[[["global", "local"], 1]],
                window_size=4,
            ),
            T.GPTNeoForCausalLM,
        ),
        "gptj": (
            T.GPTJConfig(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=2, rotary_dim=8),
            T.GPTJForCausalLM,
        ),
        "gpt_neox": (
            T.GPTNeoXConfig(
                vocab_size=V,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                use_parallel_residual=True,
            ),
            T.GPTNeoXForCausalLM,
        ),
        "opt": (
            T.OPTConfig(
                vocab_size=V,
                hidden_size=32,
                num_hidden_layers=2,
                ffn_dim=64,
                num_attention_heads=4,
                max_position_embeddings=40,
                word_embed_proj_dim=32,
            ),  # fmt: skip
            T.OPTForCausalLM,
        ),
        "bloom": (T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4), T.BloomForCausalLM),
        "llama": (
            T.LlamaConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                rope_theta=500.0,
            ),  # fmt: skip
            T.LlamaForCausalLM,
        ),
        "mixtral": (
            T.MixtralConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
                num_experts_per_tok=2,
                rope_theta=500.0,
                sliding_window=None,
            ),  # fmt: skip
            T.MixtralForCausalLM,
        ),
        "qwen3_moe": (  # dense layer 0, sparse layer 1, 3 of 8 fine-grained experts, top-k not renormalised
            T.Qwen3MoeConfig(
                vocab_size=V,
                hidden_size=32,
                intermediate_size=48,
                moe_intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                num_experts=8,
                num_experts_per_tok=3,
                decoder_sparse_step=2,
                rope_theta=500.0,
            ),  # fmt: skip
            T.Qwen3MoeForCausalLM,
        ),
        "bert": (T.BertConfig(**bert, max_position_embeddings=40), T.BertForPreTraining),
        "bert_mlm": (T.BertConfig(**bert, max_position_embeddings=40, hidden_act="gelu_new"), T.BertForMaskedLM),
        "roberta": (T.RobertaConfig(**bert, max_position_embeddings=42), T.RobertaForMaskedLM),
        "distilbert": (
            T.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40),
            T.DistilBertForMaskedLM,
        ),
        "t5": (T.T5Config(**t5), T.T5ForConditionalGeneration),
        "t5_v1_1": (
            T.T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
            T.T5ForConditionalGeneration,
        ),
        "mt5": (T.MT5Config(**t5, feed_forward_proj="gated-gelu"), T.MT5ForConditionalGeneration),
        "switch_transformers": (  # sparse layer 1 of the encoder's 2, 1 and 3 of the decoder's 4; top-1 of 4
            T.SwitchTransformersConfig(
                **dict(t5, num_decoder_layers=4),
                num_experts=4,
                num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=2,
                expert_capacity=64,  # more than a sequence: nothing dropped (tests/test_moe.py: with drops)
            ),
            T.SwitchTransformersForConditionalGeneration,
        ),
        "bart": (
            T.BartConfig(
                vocab_size=V,
                d_model=32,
                encoder_layers=2,
                decoder_layers=3,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=40,
            ),  # fmt: skip
            T.BartForConditionalGeneration,
        ),
    }


def make_reference(name: str, path: str, **overrides):
    """A transformers model of family ``name`` with non-trivial weights everywhere, saved to ``path``
    (``overrides``: config attributes changed from the spec's)."""
    import torch
    import transformers as T

    config, cls = specs(T)[name]
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(sum(map(ord, name)))
    ref = cls(config).eval()
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            # Perturb norms and biases (initialised to 1 and 0) so a dropped or swapped one cannot pass;
            # keep T5's std-1 embedding from producing huge logits.
            if p.ndim == 1 or "bias" in pname:
                p.add_(0.1 * torch.randn_like(p))
            if name in (*SEQ2SEQ[:3], "switch_transformers") and p.ndim == 2 and p.shape[0] == V:
                p.mul_(0.2)
            if name in MOE and ("experts" in pname or "router" in pname or pname.endswith("gate.weight")):
                # Decisive routing and experts that matter: with the default 0.02 init, router
                # probabilities are nearly uniform and a wrong expert choice moves logits by ~1e-4.
                p.mul_(10.0)
        if name == "t5_v1_1":  # a separate output projection, as the released v1.1 checkpoints have
            ref.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(V, 32))
        if name == "bart":
            ref.final_logits_bias.normal_()
    ref.save_pretrained(path)
    return ref


def batch(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A padded batch: row 1 right-padded, row 2 left-padded (and token types / a padded decoder)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, (4, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    if name == "roberta":
        ids[mask == 0] = 1  # RoBERTa counts positions over tokens that are not its pad id (1)
    out = {"input_ids": ids, "attention_mask": mask}
    if name.startswith("bert"):
        out["token_type_ids"] = (np.arange(11)[None] >= rs.randint(2, 9, (4, 1))).astype(np.int64)
    if name in SEQ2SEQ:
        dec = rs.randint(3, V, (4, 7))
        dmask = np.ones_like(dec)
        dmask[0, 5:] = 0
        dmask[3, 3:] = 0
        out.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
    return out


def reference_logits(name: str, ref, b: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in b.items()})
    return (out.prediction_logits if name == "bert" else out.logits).numpy()


def forward(name: str, model, b: dict):
    """The model's logits on a batch of ``batch(name)`` (traceable: jit it)."""
    if name in SEQ2SEQ:
        return model(b["input_ids"], b["decoder_input_ids"], b["attention_mask"], b["decoder_attention_mask"])
    return model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))


def our_logits(name: str, model, b: dict) -> np.ndarray:
    """Compiled once per model: eager calls would compile every operation, or the whole scan, per call."""
    from flax import nnx

    return np.asarray(nnx.jit(forward, static_argnums=0)(name, model, b))


def valid(name: str, b: dict) -> np.ndarray:
    """Where logits are defined: real (unpadded) query positions."""
    return (b["decoder_attention_mask"] if name in SEQ2SEQ else b["attention_mask"]).astype(bool)
