"""Task examples -> fixed-length numpy feature rows, laid out the way each kind of model reads a sequence.

Rows use the project's batch schema (segment id 0 = padding, positions restart at 0) plus the task's
labels: ``labels`` with ``label_weights`` (0 for padding rows and, for token classification, every
sub-token but a word's first), ``start_positions``/``end_positions`` for QA, ``decoder_*`` for
text-to-text and ``targets``/``loss_weights`` for SFT. Layouts follow the reference implementations:

  encoder   [CLS] a [SEP] b [SEP]     (RoBERTa: <s> a </s></s> b </s>); token types 0 for a, 1 for b
  decoder   <bos> a <eos> b <eos>     read at the last real token
  seq2seq   encoder: (<s>) a </s> b </s>; decoder: the same tokens shifted right after the start token
"""

from __future__ import annotations

import dataclasses

import numpy as np

from podformer.core.errors import UserError
from podformer.data import special


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str  # encoder | decoder | seq2seq
    start: int | None  # first token of a sequence ([CLS], <s>, <bos>); None: none
    sep: int  # between and after texts ([SEP], </s>, <eos>)
    pad: int
    double_sep: bool  # RoBERTa / BART put two separators between a pair
    token_types: bool  # the model reads token types (BERT)
    decoder_start: int  # seq2seq: the decoder's first input (T5: pad, BART: </s>)
    eos: int | None


def layout(framing: special.Framing, kind: str, tok, *, what: str, type_vocab_size: int = 0) -> Layout:
    """The layout of a ``kind`` model framed by ``framing`` (its family's, model/families.py); ``what`` names
    the model in errors."""
    ids = special.special_ids(tok)
    if kind == "encoder":
        start = ids.cls if ids.cls is not None else ids.bos
        sep = ids.sep if ids.sep is not None else ids.eos
        if start is None or sep is None:
            raise UserError(
                f"the tokenizer has no [CLS]/<s> or [SEP]/</s> token, which a {what} encoder needs; set "
                "data.tokenizer to the checkpoint's tokenizer"
            )
    elif kind == "decoder":
        start, sep = ids.bos, ids.eos
    else:
        start, sep = (ids.bos if framing.start is not None else None), ids.eos
    if sep is None:
        raise UserError(f"the tokenizer has no end-of-sequence token, which {what} fine-tuning needs")
    return Layout(
        kind=kind,
        start=start,
        sep=sep,
        pad=ids.pad,
        double_sep=framing.double_sep,
        token_types=kind == "encoder" and type_vocab_size >= 2,
        decoder_start=ids.eos if framing.decoder_start == "eos" else ids.pad,
        eos=ids.eos,
    )


def _truncate_pair(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Longest-first truncation (BERT's): drop tokens from the longer text until the pair fits."""
    a = list(a)
    b = None if b is None else list(b)
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return a, b


def pair_tokens(lay: Layout, a: list[int], b: list[int] | None, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, token types) of one text or a pair, truncated to ``max_len``."""
    n_special = (lay.start is not None) + 1 + (0 if b is None else 1 + lay.double_sep)
    a, b = _truncate_pair(a, b, max(max_len - n_special, 1))
    head = [lay.start] if lay.start is not None else []
    ids = head + a + [lay.sep]
    types = [0] * len(ids)
    if b is not None:
        second = ([lay.sep] if lay.double_sep else []) + b + [lay.sep]
        ids += second
        types += [1] * len(second)
    return ids[:max_len], types[:max_len]


def _rows(seqs: list[list[int]], length: int, pad: int, prefix: str = "") -> dict[str, np.ndarray]:
    n = len(seqs)
    ids = np.full((n, length), pad, np.int32)
    seg = np.zeros((n, length), np.int32)
    pos = np.zeros((n, length), np.int32)
    for i, s in enumerate(seqs):
        s = s[:length]
        ids[i, : len(s)] = s
        seg[i, : len(s)] = 1
        pos[i, : len(s)] = np.arange(len(s))
    return {f"{prefix}inputs": ids, f"{prefix}segment_ids": seg, f"{prefix}positions": pos}


def _types(types: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(types), length), np.int32)
    for i, t in enumerate(types):
        out[i, : len(t[:length])] = t[:length]
    return out


def sequence(
    examples: list[dict], tok, lay: Layout, seq_len: int, *, regression: bool = False
) -> dict[str, np.ndarray]:
    """Classification / regression rows from ``text``, optional ``text_pair`` and ``label``."""
    a_ids = tok.encode_batch([ex["text"] for ex in examples])
    pairs = [ex.get("text_pair") for ex in examples]
    b_ids = tok.encode_batch([p for p in pairs if p is not None]) if any(p is not None for p in pairs) else []
    b_iter = iter(b_ids)
    seqs, types = [], []
    for a, p in zip(a_ids, pairs, strict=True):
        ids, t = pair_tokens(lay, a, next(b_iter) if p is not None else None, seq_len)
        seqs.append(ids)
        types.append(t)
    labels = np.asarray([ex["label"] for ex in examples], np.float32 if regression else np.int32)
    out = {"labels": labels, "label_weights": np.ones(len(examples), np.float32)}
    if lay.kind == "seq2seq":
        out.update(_rows(seqs, seq_len, lay.pad, "encoder_"))
        shifted = [[lay.decoder_start] + s[:-1] for s in seqs]
        out.update(_rows(shifted, seq_len, lay.pad, "decoder_"))
    else:
        out.update(_rows(seqs, seq_len, lay.pad))
        if lay.token_types:
            out["token_types"] = _types(types, seq_len)
    return out


def tagging(examples: list[dict], tok, lay: Layout, seq_len: int, tag_names: list[str]) -> dict[str, np.ndarray]:
    """Token-classification rows: each word tokenized on its own (after a space, as in running text);
    its FIRST sub-token carries the tag, the rest are ignored (weight 0), as in BERT's NER recipe.
    ``word_ids`` (B, L) maps labelled positions back to word indices (-1 elsewhere) for decoding."""
    index = {t: i for i, t in enumerate(tag_names)}
    seqs, labels, weights, words = [], [], [], []
    for ex in examples:
        ids = [lay.start] if lay.start is not None else []
        lab, w, wid = [0] * len(ids), [0.0] * len(ids), [-1] * len(ids)
        tags = ex["tags"] if ex.get("tags") is not None else ["O"] * len(ex["tokens"])  # unlabelled: predict only
        for j, (word, tag) in enumerate(zip(ex["tokens"], tags, strict=True)):
            pieces = tok.encode(word if j == 0 else " " + word) or [lay.sep]
            if len(ids) + len(pieces) > seq_len - 1:
                break  # the remaining words are predicted as "O"
            ids += pieces
            lab += [index[tag]] + [0] * (len(pieces) - 1)
            w += [1.0] + [0.0] * (len(pieces) - 1)
            wid += [j] + [-1] * (len(pieces) - 1)
        ids.append(lay.sep)
        lab.append(0)
        w.append(0.0)
        wid.append(-1)
        seqs.append(ids)
        labels.append(lab)
        weights.append(w)
        words.append(wid)
    out = _rows(seqs, seq_len, lay.pad)
    out["labels"] = _pad(labels, seq_len, 0, np.int32)
    out["label_weights"] = _pad(weights, seq_len, 0.0, np.float32)
    out["word_ids"] = _pad(words, seq_len, -1, np.int32)
    if lay.token_types:
        out["token_types"] = np.zeros_like(out["inputs"])
    return out


def _pad(rows: list[list], length: int, value, dtype) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r[:length])] = r[:length]
    return out


def text2text(
    examples: list[dict], tok, lay: Layout, seq_len: int, target_len: int, *, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Encoder-decoder rows: the encoder reads ``prefix + inputs </s>``; the decoder is trained to emit
    ``targets </s>`` after its start token."""
    src = tok.encode_batch([prefix + ex["inputs"] for ex in examples])
    tgt = tok.encode_batch([ex["targets"] or "" for ex in examples])
    head = [lay.start] if lay.start is not None else []
    enc = [head + s[: seq_len - 1 - len(head)] + [lay.sep] for s in src]
    targets = [t[: target_len - 1] + [lay.eos] for t in tgt]
    out = _rows(enc, seq_len, lay.pad, "encoder_")
    dec = _rows([[lay.decoder_start] + t[:-1] for t in targets], target_len, lay.pad, "decoder_")
    out.update(dec)
    out["decoder_targets"] = _pad(targets, target_len, lay.pad, np.int32)
    out["decoder_loss_weights"] = (out["decoder_segment_ids"] > 0).astype(np.float32)
    return out


def sft(examples: list[dict], tok, lay: Layout, seq_len: int) -> dict[str, np.ndarray]:
    """Decoder rows ``<bos> prompt completion <eos>``, next-token targets, loss on the completion (and its
    <eos>) only. Prompts are cut from the left when the pair does not fit: the completion is what is
    learned."""
    prompts = tok.encode_batch([ex["prompt"] for ex in examples])
    completions = tok.encode_batch([ex["completion"] or "" for ex in examples])
    head = [lay.start] if lay.start is not None else []
    seqs, weights = [], []
    for p, c in zip(prompts, completions, strict=True):
        c = c[: seq_len - len(head) - 2] + [lay.eos]
        p = p[max(0, len(p) - (seq_len + 1 - len(head) - len(c))) :]
        ids = head + p + c
        seqs.append(ids)
        weights.append([0.0] * (len(head) + len(p) - 1) + [1.0] * len(c))
    rows = _rows([s[:-1] for s in seqs], seq_len, lay.pad)
    rows["targets"] = _pad([s[1:] for s in seqs], seq_len, lay.pad, np.int32)
    rows["loss_weights"] = _pad(weights, seq_len, 0.0, np.float32)
    return rows


def prompts(texts: list[str], tok, lay: Layout, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """LEFT-padded decoder prompts ``<bos> text`` (ids, attention mask) for generation."""
    head = [lay.start] if lay.start is not None else []
    seqs = [head + s[-(max_len - len(head)) :] for s in tok.encode_batch(texts)]
    ids = np.full((len(seqs), max_len), lay.pad, np.int32)
    mask = np.zeros((len(seqs), max_len), np.int32)
    for i, s in enumerate(seqs):
        ids[i, max_len - len(s) :] = s
        mask[i, max_len - len(s) :] = 1
    return ids, mask


def pad_rows(rows: dict[str, np.ndarray], multiple: int) -> tuple[dict[str, np.ndarray], int]:
    """Rows padded with copies of row 0 at weight 0 to a multiple of ``multiple`` (evaluation runs every
    example exactly once in whole global batches). Returns (rows, number of real rows)."""
    n = len(next(iter(rows.values())))
    extra = (-n) % multiple
    if not extra:
        return rows, n
    out = {}
    for k, v in rows.items():
        filler = np.repeat(v[:1], extra, axis=0)
        if k in ("label_weights", "loss_weights", "decoder_loss_weights"):
            filler = np.zeros_like(filler)
        out[k] = np.concatenate([v, filler])
    return out, n


class Rows:
    """Random-access rows over a dict of equal-length arrays (what data.loader.Loader reads)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}
