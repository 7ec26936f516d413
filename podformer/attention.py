"""Attention maps: what each layer and head of a model attends to, as a picture and as text.

    python -m podformer.attention --model=runs/bert_tiny --token=it --out=attention.png \
        --text="The monkey ate that banana because it was too hungry."

The weights are those the model computes: model/attention.py's ``record_weights`` runs every attention
through its reference path and keeps the softmax. Encoders, decoders (the causal mask is shown) and
encoder-decoders (encoder, decoder self- and cross-attention, one picture each).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import numpy as np
from flax import nnx

from podformer import generate_cli
from podformer.core.errors import UserError
from podformer.model import attention as attention_lib
from podformer.model import bert, gpt, t5

USAGE = """usage: python -m podformer.attention --model=WORKDIR_OR_HF_FOLDER --text=TEXT [--token=WORD]
    [--out=attention.png] [--target=TEXT (an encoder-decoder's decoder input; default: --text)] [--step=N|best]"""
FLAGS = ("model", "text", "token", "out", "target", "step")


def weights(model, ids, mask, decoder_ids=None) -> dict[str, list[np.ndarray]]:
    """{kind: per-layer weights (B, H, L, S) float32}: 'encoder' (BERT, and T5's encoder), 'decoder' (GPT
    and T5's decoder self-attention), 'cross' (T5's decoder over the encoder). ``model`` must run its
    layers unrolled (scan_layers=False, remat='none': a scan would keep the weights inside its trace)."""
    if getattr(model.cfg, "scan_layers", False) or getattr(model.cfg, "remat", "none") != "none":
        raise UserError("attention weights need unrolled layers: build the model with scan_layers=False, remat='none'")
    graphdef, state = nnx.split(model)
    kinds = _weights(
        graphdef, state, np.asarray(ids), np.asarray(mask), None if decoder_ids is None else np.asarray(decoder_ids)
    )
    return {k: [np.asarray(w) for w in v] for k, v in kinds.items()}


@functools.partial(jax.jit, static_argnums=0)
def _weights(graphdef, state, ids, mask, decoder_ids):
    m = nnx.merge(graphdef, state)
    if isinstance(m, bert.Bert):
        with attention_lib.record_weights() as enc:
            m.encode(ids, mask)
        return {"encoder": enc}
    if isinstance(m, gpt.GPT):
        with attention_lib.record_weights() as dec:
            m(ids, mask)
        return {"decoder": dec}
    if isinstance(m, t5.T5):
        with attention_lib.record_weights() as enc:
            encoded = m.encode(ids, mask)
        with attention_lib.record_weights() as dec:
            m.decode(decoder_ids, encoded, mask)
        return {"encoder": enc, "decoder": dec[0::2], "cross": dec[1::2]}  # each block: self, then cross
    raise UserError(f"attention maps: {type(m).__name__} is not a BERT, GPT or T5/BART model")


def clean(piece: str) -> str:
    """A token as a person reads it: no SentencePiece/byte-BPE space marks, no WordPiece continuation."""
    for mark in ("\u2581", "\u0120", "##"):
        piece = piece.replace(mark, "")
    return piece or "\u2423"


def find(tokens: list[str], word: str) -> int:
    """The index of the first token that is ``word`` (case-insensitive), else a one-line error."""
    for i, t in enumerate(tokens):
        if t.lower() == word.lower():
            return i
    raise UserError(f"--token={word!r} is none of the text's tokens: {' '.join(tokens)}")


def top(weights_HLS: np.ndarray, query: int, tokens: list[str], k: int = 3, *, causal: bool = False):
    """The ``k`` (token, weight) keys the query attends to most, averaged over heads; a causal query's
    future keys (masked) are never among them."""
    row = weights_HLS[:, query].mean(axis=0)
    if causal:
        row = row[: query + 1 + row.shape[0] - weights_HLS.shape[1]]
    order = np.argsort(-row, kind="stable")[:k]
    return [(tokens[i], float(row[i])) for i in order]


def draw(layers_HLS: list[np.ndarray], q_tokens, k_tokens, query: int | None, *, causal: bool, title: str, out: str):
    """A grid of every layer's (rows) and head's (columns) heatmap, query tokens down and key tokens
    across, and a summary panel: the chosen token's attention in each layer, mean over heads."""
    import matplotlib
    from matplotlib.figure import Figure

    masked_colors = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")

    N, H = len(layers_HLS), layers_HLS[0].shape[0]
    cell = 0.95
    fig = Figure(figsize=(cell * H + 6.5, max(cell * N + 1.6, 4.5)), layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[cell * H, 5.5])
    grid = outer[0].subgridspec(N, H, wspace=0.05, hspace=0.05)
    hidden = np.triu(np.ones((len(q_tokens), len(k_tokens)), bool), k=1 + len(k_tokens) - len(q_tokens))
    image = None
    for i, w in enumerate(layers_HLS):
        for h in range(H):
            ax = fig.add_subplot(grid[i, h])
            shown = np.ma.masked_array(w[h], hidden & causal)
            image = ax.imshow(shown, cmap=masked_colors, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {h + 1}", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"layer {i + 1}", fontsize=7)
    fig.colorbar(image, ax=fig.axes, location="left", shrink=0.6, label="attention weight")
    fig.suptitle(title + ("  (grey: masked by causality)" if causal else ""), fontsize=10)
    ax = fig.add_subplot(outer[1])
    if query is None:
        ax.axis("off")
    else:
        summary = np.stack([w[:, query].mean(axis=0) for w in layers_HLS])  # (layers, S)
        future = np.broadcast_to(hidden[query] & causal, summary.shape)
        summary_colors = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
        shown = np.ma.masked_array(summary, future)
        ax.imshow(shown, cmap=summary_colors, vmin=0.0, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(k_tokens)), k_tokens, rotation=70, fontsize=8, ha="right")
        ax.set_yticks(range(N), [f"layer {i + 1}" for i in range(N)], fontsize=8)
        ax.set_title(f"what {q_tokens[query]!r} attends to (mean over heads)", fontsize=9)
        for i, row in enumerate(summary):
            j = int(np.argmax(row))
            ax.text(j, i, f"{row[j]:.2f}", ha="center", va="center", fontsize=7, color="black")
    fig.savefig(out, dpi=100)
    return out


def run(argv: list[str]) -> dict:
    flags = {}
    for a in argv:
        name, eq, value = a[2:].partition("=")
        if not a.startswith("--") or name not in FLAGS or not eq:
            raise UserError(f"unknown argument {a!r}\n{USAGE}")
        flags[name] = value
    if "model" not in flags or "text" not in flags:
        raise UserError(f"--model and --text are required\n{USAGE}")
    step = flags.get("step")
    m = generate_cli.load(flags["model"], step, scan_layers=False, remat="none")
    ids = m.encode(flags["text"])
    tokens = [clean(m.tokenizer.id_to_piece(i)) for i in ids]
    decoder_ids = dec_tokens = None
    if isinstance(m.model, t5.T5):
        decoder_ids = [m.decoder_start_id, *m.tokenizer.encode(flags.get("target", flags["text"]))]
        dec_tokens = [clean(m.tokenizer.id_to_piece(i)) for i in decoder_ids]
    if "token" in flags:  # a word the text lacks fails before the model runs
        find(tokens + (dec_tokens or []), flags["token"])
    found = weights(m.model, [ids], [[1] * len(ids)], None if decoder_ids is None else [decoder_ids])
    out = flags.get("out", "attention.png")
    stem, ext = os.path.splitext(out)
    result = {}
    for kind in [k for k in ("encoder", "decoder", "cross") if k in found]:  # jit returns dicts key-sorted
        layers_BHLS = found[kind]
        q_tokens = tokens if kind == "encoder" or dec_tokens is None else dec_tokens
        k_tokens = dec_tokens if kind == "decoder" and dec_tokens is not None else tokens
        query = None
        if "token" in flags and (len(found) == 1 or flags["token"].lower() in (t.lower() for t in q_tokens)):
            query = find(q_tokens, flags["token"])  # an encoder-decoder: the side whose queries have it
        path = out if len(found) == 1 or kind == "encoder" else f"{stem}_{kind}{ext or '.png'}"
        layers_HLS = [w[0] for w in layers_BHLS]
        name = {"encoder": "self-attention", "decoder": "causal self-attention", "cross": "cross-attention"}[kind]
        where = "/".join(os.path.normpath(os.path.abspath(flags["model"])).split(os.sep)[-2:])
        title = f"{where}: {name}, {len(layers_HLS)} layers x {layers_HLS[0].shape[0]} heads"
        draw(layers_HLS, q_tokens, k_tokens, query, causal=kind == "decoder", title=title, out=path)
        print(f"{kind} ({name}): {path}")
        tops = []
        if query is not None:
            for i, w in enumerate(layers_HLS):
                tops.append(top(w, query, k_tokens, causal=kind == "decoder"))
                print(f"  layer {i + 1}: {q_tokens[query]!r} -> " + ", ".join(f"{t} {p:.3f}" for t, p in tops[-1]))
        result[kind] = {"path": path, "tokens": q_tokens, "top": tops, "weights": layers_HLS}
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
