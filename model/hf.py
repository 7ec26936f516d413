"""Hugging Face interop: read and write local transformers model folders (config.json + safetensors)."""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from model import gpt, params


class HFError(ValueError):
    """A Hugging Face folder podformer cannot read or write; the message says why."""


# ---------------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config(hf: dict, **overrides) -> gpt.GPTConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"GPT-2 activation_function={act!r} is not supported (podformer's GPT-2 uses tanh GELU)")
    return gpt.GPTConfig(
        vocab_size=hf["vocab_size"],
        max_len=hf["n_positions"],
        d_model=hf["n_embd"],
        num_layers=hf["n_layer"],
        num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
        norm_eps=hf["layer_norm_epsilon"],
        init_std=hf.get("initializer_range", 0.02),
        **overrides,
    )


def gpt2_from_hf(sd: dict[str, np.ndarray], cfg: gpt.GPTConfig) -> dict[str, np.ndarray]:
    """transformers GPT2LMHeadModel state dict -> podformer canonical parameters."""
    D, H, K = cfg.d_model, cfg.num_heads, cfg.resolved_head_dim
    p = "transformer." if "transformer.wte.weight" in sd else ""
    out = {"embed": sd[f"{p}wte.weight"], "pos_embed": sd[f"{p}wpe.weight"]}
    out["final_norm.scale"], out["final_norm.bias"] = sd[f"{p}ln_f.weight"], sd[f"{p}ln_f.bias"]
    for i in range(cfg.num_layers):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        w, bias = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]  # Conv1D: (in, out)
        for j, name in enumerate(("query", "key", "value")):
            out[b + f"attn.{name}.kernel"] = w[:, j * D : (j + 1) * D].reshape(D, H, K)
            out[b + f"attn.{name}.bias"] = bias[j * D : (j + 1) * D].reshape(H, K)
        out[b + "attn.out.kernel"] = sd[h + "attn.c_proj.weight"].reshape(H, K, D)
        out[b + "attn.out.bias"] = sd[h + "attn.c_proj.bias"]
        out[b + "mlp.wi.kernel"], out[b + "mlp.wi.bias"] = sd[h + "mlp.c_fc.weight"], sd[h + "mlp.c_fc.bias"]
        out[b + "mlp.wo.kernel"], out[b + "mlp.wo.bias"] = sd[h + "mlp.c_proj.weight"], sd[h + "mlp.c_proj.bias"]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[b + f"{ours}.scale"], out[b + f"{ours}.bias"] = sd[h + f"{theirs}.weight"], sd[h + f"{theirs}.bias"]
    return out


# ---------------------------------------------------------------------------------------------------
# Folders

FORMATS = {"gpt2": (gpt2_config, gpt.GPT, gpt2_from_hf)}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd: dict[str, np.ndarray] = {}
        for name in files:
            sd.update(load_file(os.path.join(path, name)))
        return sd
    raise HFError(f"{path}: no model.safetensors or model.safetensors.index.json")


def from_pretrained(path: str, *, rngs_seed: int = 0, **overrides) -> nnx.Module:
    """A podformer module with the weights of the local Hugging Face folder ``path``."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise HFError(f"{path}: no config.json; point at a Hugging Face model folder")
    with open(cfg_path) as f:
        hf_cfg = json.load(f)
    family = hf_cfg.get("model_type")
    if family not in FORMATS:
        raise HFError(f"{path}: model_type {family!r} is not supported; supported: {', '.join(sorted(FORMATS))}")
    make_config, module_cls, convert = FORMATS[family]
    cfg = make_config(hf_cfg, **overrides)
    sd = {k: v.astype(np.float32) for k, v in read_state_dict(path).items()}
    model = nnx.eval_shape(lambda: module_cls(cfg, rngs=nnx.Rngs(rngs_seed)))
    model = module_cls(cfg, rngs=nnx.Rngs(rngs_seed))
    params.set_params(model, convert(sd, cfg))
    return model
