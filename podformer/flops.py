"""Model FLOPs per token and per-device peak FLOP/s, for MFU.

Training FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B):

    6 * N  +  12 * n_layers * n_heads * head_dim * seq_len

where N counts the parameters that take part in matrix multiplies (every parameter except lookup-only
tables: learned positions, and the token embedding when the output head is untied; a tied embedding
is counted once, as the output projection; a mixture of experts' expert weights count k / E of theirs, the
active share: FLOPs of active parameters). The first term is the forward (2N) and backward (4N)
matmuls; the second the attention score and value products (QK^T and AV), also counted 1x forward +
2x backward, over the full (not causally halved) sequence as in PaLM. Rematerialisation is not
counted: this is model FLOPs utilisation, not hardware FLOPs.

Encoders use the same formula (bidirectional attention is full anyway). For encoder-decoders a "token" is
one encoder position (tokens/s counts encoder rows of train.seq_len), and the FLOPs of a row pair are
spread over it: encoder parameters run on L_enc positions, decoder parameters (and the output
projection) on L_dec, which span corruption makes much shorter than L_enc (T5: 114 targets for 512
inputs); the attention terms are the encoder's self-attention (L_enc x L_enc), the decoder's
self-attention (L_dec x L_dec) and its cross-attention (L_dec x L_enc), each 12 * n_heads * head_dim
per layer and query-key pair. Local attention (GPT-Neo) and the causal mask are counted at full
length, as PaLM does.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from podformer.model import families

# bf16 dense peak FLOP/s per device (chip) from the vendors' spec sheets.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "h100": 989e12,  # SXM; PCIe is lower and should be configured explicitly
    "h200": 989e12,
    "a100": 312e12,
}

# Tables that are only read, never multiplied: learned positions, token types, T5's relative-bias buckets.
LOOKUP_ONLY = ("pos_embed", "token_type_embed", "rel_bias.table")


def matmul_params(named_sizes: dict[str, int], tied: bool, expert_share: float = 1.0) -> float:
    """The parameters a token's matmuls use: a mixture-of-experts layer's expert weights count with
    ``expert_share`` (experts_per_token / num_experts: the active ones), its router and shared experts fully."""
    n = 0.0
    for name, size in named_sizes.items():
        if any(name == k or name.endswith("." + k) for k in LOOKUP_ONLY):
            continue
        if name == "embed" and not tied:
            continue
        n += size * (expert_share if ".experts." in f".{name}." else 1.0)
    return n


def expert_share(model_cfg) -> float:
    E = getattr(model_cfg, "num_experts", 0)
    return model_cfg.experts_per_token / E if E else 1.0


def per_token(model_cfg, named_sizes: dict[str, int], seq_len: int, decoder_len: int | None = None) -> float:
    """Training FLOPs per token; for an encoder-decoder per encoder position, with ``decoder_len`` the
    decoder rows' length (default ``seq_len``)."""
    # Encoders' MLM heads always project onto the tied embedding (no tie_embeddings field: tied).
    tied = getattr(model_cfg, "tie_embeddings", True)
    per_pair = 12 * model_cfg.num_heads * model_cfg.resolved_head_dim  # one query-key pair, one layer
    if families.of(model_cfg).kind != "seq2seq":
        n = matmul_params(named_sizes, tied, expert_share(model_cfg))
        return 6.0 * n + per_pair * model_cfg.num_layers * seq_len
    L_e, L_d = seq_len, decoder_len or seq_len
    enc = {k: v for k, v in named_sizes.items() if k.startswith("encoder.")}
    dec = {k: v for k, v in named_sizes.items() if k not in enc}  # decoder, embedding / output projection
    share = expert_share(model_cfg)
    n_enc, n_dec = matmul_params(enc, tied, share), matmul_params(dec, tied, share)
    attention = per_pair * (model_cfg.num_layers * L_e * L_e + model_cfg.decoder_layers * (L_d * L_d + L_d * L_e))
    return (6.0 * (n_enc * L_e + n_dec * L_d) + attention) / L_e


def decoder_len(batch: dict) -> int | None:
    """The decoder rows' length of an encoder-decoder batch (None for other batches)."""
    d = batch.get("decoder_targets")
    return None if d is None else int(d.shape[1])


def known_peak(device) -> float | None:
    kind = device.device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Achieved float32 matmul FLOP/s on the first local device (the ceiling on CPUs, where no spec
    sheet applies); with several fake devices on one host they share the same cores."""
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_per_device(configured_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure came from)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12, "configured"
    device = jax.local_devices()[0]
    peak = known_peak(device)
    if peak is not None:
        return peak, f"spec sheet ({device.device_kind}, bf16)"
    measured = measure_matmul_peak() / max(1, len(jax.local_devices()))
    return measured, f"measured float32 matmul on {device.platform}"


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float, num_devices: int) -> float:
    return float(np.float64(tokens_per_sec) * flops_per_token / (peak * num_devices))
