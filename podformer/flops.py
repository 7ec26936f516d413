"""Model FLOPs per token and per-device peak FLOP/s, for MFU.

Training FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B):

    6 * N  +  12 * n_layers * n_heads * head_dim * seq_len

where N counts the parameters that take part in matrix multiplies (every parameter except lookup-only
tables: learned positions, and the token embedding when the output head is untied; a tied embedding
is counted once, as the output projection). The first term is the forward (2N) and backward (4N)
matmuls; the second the attention score and value products (QK^T and AV), also counted 1x forward +
2x backward, over the full (not causally halved) sequence as in PaLM. Rematerialisation is not
counted: this is model FLOPs utilisation, not hardware FLOPs.

Encoders use the same formula (bidirectional attention is full anyway). For encoder-decoders a "token" is
one position of a row pair (encoder and decoder rows of train.seq_len each): every encoder and decoder
parameter is used once per position, and the attention term counts the encoder's self-attention and the
decoder's self- and cross-attention, 12 * (n_enc + 2 n_dec) * n_heads * head_dim * seq_len. Local
attention (GPT-Neo) and the causal mask are counted at full length, as PaLM does.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

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


def matmul_params(named_sizes: dict[str, int], tied: bool) -> int:
    n = 0
    for name, size in named_sizes.items():
        if any(name == k or name.endswith("." + k) for k in LOOKUP_ONLY):
            continue
        if name == "embed" and not tied:
            continue
        n += size
    return n


def per_token(model_cfg, named_sizes: dict[str, int], seq_len: int) -> float:
    # Encoders' MLM heads always project onto the tied embedding (no tie_embeddings field: tied).
    n = matmul_params(named_sizes, getattr(model_cfg, "tie_embeddings", True))
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
    layers = model_cfg.num_layers
    if hasattr(model_cfg, "decoder_layers"):  # encoder-decoder: decoder layers attend twice
        layers += 2 * model_cfg.decoder_layers
    attention = 12 * layers * model_cfg.num_heads * head_dim * seq_len
    return 6.0 * n + attention


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
