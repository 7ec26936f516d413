"""The vocabulary of Hugging Face conversions: one reversible rule per tensor, and per-family formats.

A ``Rule`` maps one tensor of a transformers state dict to one or more podformer canonical parameters
(model/params.py names) and back. Every transform is a reshape, a transpose or a slice, so import then
export reproduces each tensor bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

from podformer.core.errors import UserError


class HFError(UserError, ValueError):
    """A Hugging Face folder podformer cannot read or write; the message says why and what to do (entry
    points print it as one ``podformer: error:`` line)."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # the transformers state-dict name
    ours: tuple[str, ...]  # canonical podformer names
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def linear(hf: str, ours: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
    """torch.nn.Linear weight (out, in) <-> our kernel (*in_shape, *out_shape)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Rule(hf, (ours,), lambda w: (w.T.reshape(in_shape + out_shape),), lambda k: k.reshape(n_in, n_out).T)


def conv1d(hf: str, ours: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Rule:
    """GPT-2's Conv1D weight, already (in, out) <-> our kernel."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Rule(hf, (ours,), lambda w: (w.reshape(in_shape + out_shape),), lambda k: k.reshape(n_in, n_out))


def tensor(hf: str, ours: str, shape: tuple[int, ...] | None = None, hf_shape: tuple[int, ...] = (-1,)) -> Rule:
    """Same values, possibly another shape (biases (H*K,) <-> (H, K); norms; embedding tables)."""
    if shape is None:
        return Rule(hf, (ours,), lambda w: (w,), lambda x: x)
    return Rule(hf, (ours,), lambda w: (w.reshape(shape),), lambda x: x.reshape(hf_shape))


def unembed(hf: str, ours: str) -> Rule:
    """An untied output projection: transformers (V, D) <-> ours (D, V)."""
    return Rule(hf, (ours,), lambda w: (w.T,), lambda k: k.T)


def fused_qkv(hf: str, ours: tuple[str, str, str], D: int, H: int, K: int, layout: str, bias: bool) -> Rule:
    """One fused query/key/value projection. layout 'blocks': [q | k | v] along the output (GPT-2's Conv1D,
    (D, 3D)); 'heads': per head [q k v] (BLOOM and GPT-NeoX Linear, (H*3*K, D))."""
    if layout == "blocks":
        if bias:
            return Rule(
                hf, ours, lambda b: tuple(b.reshape(3, H, K)), lambda q, k, v: np.concatenate([q, k, v], 0).reshape(-1)
            )
        return Rule(
            hf,
            ours,
            lambda w: tuple(np.moveaxis(w.reshape(D, 3, H, K), 1, 0)),
            lambda q, k, v: np.stack([q, k, v], 1).reshape(D, 3 * H * K),
        )
    if bias:
        return Rule(
            hf, ours, lambda b: tuple(np.moveaxis(b.reshape(H, 3, K), 1, 0)), lambda *x: np.stack(x, 1).reshape(-1)
        )
    return Rule(
        hf,
        ours,
        lambda w: tuple(np.transpose(w.reshape(H, 3, K, D), (1, 3, 0, 2))),  # (3, D, H, K)
        lambda q, k, v: np.stack([x.transpose(1, 2, 0) for x in (q, k, v)], 1).reshape(3 * H * K, D),
    )


def norm(hf: str, ours: str, bias: bool = True, weight: str = "weight") -> list[Rule]:
    rules = [tensor(f"{hf}.{weight}", f"{ours}.scale")]
    return rules + [tensor(f"{hf}.bias", f"{ours}.bias")] if bias else rules


def attention(
    hf: str, ours: str, names: tuple[str, str, str, str], dims: tuple[int, int, int, int], *, qkv_bias, out_bias
) -> list[Rule]:
    """Separate q/k/v/out torch Linears ``{hf}.{name}.weight`` -> ``{ours}.{query,key,value,out}``."""
    D, H, G, K = dims
    rules = []
    for name, our, heads in zip(names[:3], ("query", "key", "value"), (H, G, G), strict=True):
        rules.append(linear(f"{hf}.{name}.weight", f"{ours}.{our}.kernel", (D,), (heads, K)))
        if qkv_bias:
            rules.append(tensor(f"{hf}.{name}.bias", f"{ours}.{our}.bias", (heads, K)))
    rules.append(linear(f"{hf}.{names[3]}.weight", f"{ours}.out.kernel", (H, K), (D,)))
    if out_bias:
        rules.append(tensor(f"{hf}.{names[3]}.bias", f"{ours}.out.bias"))
    return rules


def mlp(hf: str, ours: str, names: dict[str, str], D: int, F: int, *, bias: bool) -> list[Rule]:
    """``names``: our wi/wg/wo -> the transformers Linear names."""
    rules = []
    for our, name in names.items():
        shapes = ((F,), (D,)) if our == "wo" else ((D,), (F,))
        rules.append(linear(f"{hf}.{name}.weight", f"{ours}.{our}.kernel", *shapes))
        if bias:
            rules.append(tensor(f"{hf}.{name}.bias", f"{ours}.{our}.bias"))
    return rules


def expert_packing(experts: str, name: str, index: str = ""):
    """(pack, unpack) for checkpoints that keep one Linear per expert, ``<layer>{experts}.{index}{j}.{w}.weight``
    (``name`` the regex of the w's; Switch's ``index`` is 'expert_'), stacked to one (E, out, in) tensor
    ``<layer>{experts}.{w}`` per layer for the rules (the checkpoints' layout; transformers' in-memory fused
    tensors are converted back to it on save)."""
    pattern = re.compile(rf"^(.*{re.escape(experts)})\.{index}(\d+)\.({name})\.weight$")

    def pack(sd: dict) -> dict:
        out, groups = {}, {}
        for k, v in sd.items():
            m = pattern.match(k)
            if m is None:
                out[k] = v
            else:
                groups.setdefault(f"{m[1]}.{m[3]}", {})[int(m[2])] = v
        for k, per in groups.items():
            out[k] = np.stack([per[j] for j in range(len(per))])
        return out

    def unpack(sd: dict) -> dict:
        out = {}
        for k, v in sd.items():
            head, _, w = k.rpartition(".")
            if head.endswith(experts) and re.fullmatch(name, w):
                out.update({f"{head}.{index}{j}.{w}.weight": v[j] for j in range(v.shape[0])})
            else:
                out[k] = v
        return out

    return pack, unpack


def expert_linear(hf: str, ours: str) -> Rule:
    """Stacked torch Linear weights (E, out, in) <-> our expert kernel (E, in, out)."""
    return Rule(hf, (ours,), lambda w: (np.swapaxes(w, 1, 2),), lambda k: np.swapaxes(k, 1, 2))


REQUIRED = object()  # a Field default: the key must be in config.json


@dataclasses.dataclass(frozen=True)
class Field:
    """One config.json key <-> one family-config field. A format's table of these is what its
    ``config_from_hf`` reads and its ``config_to_hf`` writes: the mapping is written once, for both."""

    hf: str
    ours: str
    # What an absent (or null) key means: a value, a function of the whole config.json, or REQUIRED.
    default: object = REQUIRED
    read: Callable[[object], object] = lambda v: v  # config.json value -> ours
    write: Callable[[object], object] | None = None  # family config -> config.json value (None: the field)
    written: bool = True  # False: read only (training settings such as dropout keep transformers' defaults)


def fields_from_hf(fields: tuple[Field, ...], hf: dict) -> dict:
    """The family-config fields the table sets, from a config.json dict (KeyError: a required key is absent)."""
    out = {}
    for f in fields:
        value = hf.get(f.hf)
        if value is None:
            if f.default is REQUIRED:
                raise KeyError(f.hf)
            value = f.default(hf) if callable(f.default) else f.default
        out[f.ours] = f.read(value)
    return out


def fields_to_hf(fields: tuple[Field, ...], cfg) -> dict:
    """The config.json keys the table writes, from a family config."""
    return {f.hf: f.write(cfg) if f.write else getattr(cfg, f.ours) for f in fields if f.written}


def activation(hf: str, default: str) -> Field:
    return Field(
        hf, "activation", default, lambda v: activation_from_hf(v, hf), lambda c: activation_to_hf(c.activation)
    )


def training(hf: str, ours: str, default: float, read: Callable = lambda v: v) -> Field:
    """A training setting (dropout, initialisation): read, never written."""
    return Field(hf, ours, default, read, written=False)


@dataclasses.dataclass(frozen=True)
class Format:
    """How one transformers ``model_type`` maps onto one podformer family."""

    model_type: str  # listed by its family's row (model/families.py hf_formats)
    # (config.json dict, state dict) -> the family config
    config_from_hf: Callable[[dict, dict], object]
    # family config -> config.json dict (architecture fields only; transformers fills in the rest)
    config_to_hf: Callable[[object], dict]
    rules: Callable[[object], list[Rule]]
    architecture: str | Callable[[object], str]  # the transformers class written into config.json
    prefix: str = ""  # the base model's prefix ('transformer.'): bare base-model checkpoints lack it
    # Regexes of state-dict names that carry nothing podformer needs: tied copies and saved buffers.
    ignore: tuple[str, ...] = ()
    # Canonical parameters a checkpoint may lack (a base model without its LM head): they keep their
    # initial values, and the caller is told.
    optional: tuple[str, ...] = ()
    # transformers' base-model class and the prefix its tensors carry inside the full model (what export
    # writes when no head exists; bare base-model checkpoints have no prefix).
    base_model: tuple[str, str] = ("", "")
    # State dict -> the one the rules read, and back (Mixtral's experts: one tensor per expert on disk,
    # stacked on a leading expert axis for the rules). Only stacking and slicing: bit for bit both ways.
    pack: Callable[[dict], dict] | None = None
    unpack: Callable[[dict], dict] | None = None


def architecture(fmt: Format, cfg) -> str:
    return fmt.architecture if isinstance(fmt.architecture, str) else fmt.architecture(cfg)


ACTIVATIONS_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",  # the same tanh approximation, constants precomputed
    "bloom_gelu": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def activation_from_hf(name: str, where: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise HFError(f"{where}={name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS_FROM_HF))}")
    return ACTIVATIONS_FROM_HF[name]


def activation_to_hf(name: str) -> str:
    if name not in ACTIVATIONS_TO_HF:
        raise HFError(f"activation {name!r} has no transformers equivalent")
    return ACTIVATIONS_TO_HF[name]


def rope_from_hf(hf: dict, *, theta_key: str = "rope_theta", factor_key: str = "", default_factor: float = 1.0):
    """(theta, partial rotary factor) from transformers 5's ``rope_parameters`` or the older top-level keys.
    Only plain RoPE is supported; scaled variants (linear, dynamic, YaRN, llama3) are refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise HFError(f"rope_type={kind!r} (scaled rotary embeddings) is not supported; only plain RoPE is")
    theta = params.get("rope_theta", hf.get(theta_key, 10000.0))
    factor = params.get("partial_rotary_factor", hf.get(factor_key, default_factor) if factor_key else default_factor)
    return float(theta), float(factor)


def tied(hf: dict, sd: dict, head: str, embed: str, default: bool) -> bool:
    """Whether the output projection is the input embedding. A checkpoint without the head tensor is
    tied; one with a head equal to the embedding (pytorch .bin files store both) follows its config;
    a different head is untied whatever the config says (as transformers decides too)."""
    if head not in sd:
        return True
    if embed in sd and sd[head].shape == sd[embed].shape and np.array_equal(sd[head], sd[embed]):
        return bool(hf.get("tie_word_embeddings", default))
    return False
