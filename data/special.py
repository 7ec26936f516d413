"""Special tokens: which ones each pretraining objective needs, how a family frames text with them, and
how objectives find their ids.

A tokenizer provides ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``, ``piece_to_id(piece) -> int | None``
and ``id_to_piece(id)`` (data/tokenizer.SentencePieceTokenizer; data/hf_tokenizer.py has the same
interface). T5 sentinels follow T5's convention: ``<extra_id_0>`` is the LAST id of the vocabulary and
``<extra_id_i>`` is ``vocab_size - 1 - i``; podformer-trained tokenizers append them at the end.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from podformer.core.errors import UserError

NUM_SENTINELS = 100


def sentinels(n: int = NUM_SENTINELS) -> tuple[str, ...]:
    return tuple(f"<extra_id_{i}>" for i in range(n))


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """The special tokens a trained tokenizer gets beyond <s>, </s>, <pad>, <unk>, which always exist."""

    name: str  # tags the cached tokenizer's file name (gpt's none: existing caches and hashes hold)
    symbols: tuple[str, ...] = ()
    sentinels: int = 0  # <extra_id_i>, appended at the end of the vocabulary


TOKEN_SETS = {
    t.name: t
    for t in (
        TokenSet("gpt"),
        TokenSet("bert", ("[CLS]", "[SEP]", "[MASK]")),
        TokenSet("roberta", ("<mask>",)),
        TokenSet("bart", ("<mask>",)),
        TokenSet("t5", (), NUM_SENTINELS),
        TokenSet("all", ("[CLS]", "[SEP]", "[MASK]", "<mask>"), NUM_SENTINELS),
    )
}

# The token set each pretraining objective needs (a family's tokenizer is its objective's: model/families.py).
OBJECTIVE_TOKENS = {
    "causal_lm": TOKEN_SETS["gpt"],
    "mlm": TOKEN_SETS["bert"],
    "mlm_nsp": TOKEN_SETS["bert"],
    "mlm_sop": TOKEN_SETS["bert"],
    "distill": TOKEN_SETS["bert"],
    "roberta": TOKEN_SETS["roberta"],
    "span_corruption": TOKEN_SETS["t5"],
    "prefix_lm": TOKEN_SETS["t5"],
    "bart": TOKEN_SETS["bart"],
}


@dataclasses.dataclass(frozen=True)
class Framing:
    """How a family frames text with special tokens; its row in model/families.py holds one. ``start`` and
    ``sep`` are pieces (what an exported tokenizer adds around a text), ``decoder_start`` names the id an
    encoder-decoder's decoder starts from."""

    start: str | None  # before a text ([CLS], <s>); None: nothing (T5)
    sep: str | None  # after each text ([SEP], </s>); None: nothing (GPT)
    double_sep: bool = False  # two separators between a pair (RoBERTa, BART)
    decoder_start: str = "pad"  # encoder-decoders: 'pad' (T5) or 'eos' (BART)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    vocab_size: int
    pad: int
    bos: int | None
    eos: int | None
    unk: int | None
    cls: int | None  # [CLS]
    sep: int | None  # [SEP]
    mask: int | None  # [MASK] or <mask>
    num_sentinels: int  # <extra_id_0> = vocab_size - 1, counting down

    def require(self, *names: str, what: str) -> None:
        missing = [n for n in names if getattr(self, n) is None or (n == "num_sentinels" and not self.num_sentinels)]
        if missing:
            raise UserError(
                f"{what} needs the tokenizer's {', '.join(missing)} token(s); train one with "
                "`python -m podformer.data.tokenizer train --family ...` (its token set) or set data.tokenizer to "
                "one that has them"
            )

    def special_mask(self) -> np.ndarray:
        """bool[vocab]: tokens an objective must never select (controls, [CLS]/[SEP]/[MASK], sentinels)."""
        out = np.zeros(self.vocab_size, bool)
        for i in (self.pad, self.bos, self.eos, self.unk, self.cls, self.sep, self.mask):
            if i is not None:
                out[i] = True
        if self.num_sentinels:
            out[self.vocab_size - self.num_sentinels :] = True
        return out


def _piece_id(tok, piece: str) -> int | None:
    i = tok.piece_to_id(piece)
    return None if i is None or i < 0 else int(i)


@functools.lru_cache(maxsize=8)
def _cached(tok) -> SpecialIds:
    v = tok.vocab_size
    n = 0
    while n < NUM_SENTINELS and _piece_id(tok, f"<extra_id_{n}>") == v - 1 - n:
        n += 1
    return SpecialIds(
        vocab_size=v,
        pad=tok.pad_id,
        bos=tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else None,
        eos=tok.eos_id if tok.eos_id is not None and tok.eos_id >= 0 else None,
        unk=_piece_id(tok, "<unk>") if _piece_id(tok, "<unk>") is not None else _piece_id(tok, "[UNK]"),
        cls=_piece_id(tok, "[CLS]"),
        sep=_piece_id(tok, "[SEP]"),
        mask=_piece_id(tok, "[MASK]") if _piece_id(tok, "[MASK]") is not None else _piece_id(tok, "<mask>"),
        num_sentinels=n,
    )


def special_ids(tok) -> SpecialIds:
    """The special-token ids of ``tok`` (looked up once per tokenizer)."""
    return _cached(tok)


def word_start_table(tok) -> tuple[np.ndarray, np.ndarray]:
    """(starts[vocab], ends[vocab]) for whole-word masking: a token starts a word when its piece begins
    one (WordPiece: no ``##``; SentencePiece/byte-level BPE: a leading ``▁``/``Ġ``/space or
    punctuation), or when the previous token ends with a space or punctuation."""
    pieces = [tok.id_to_piece(i) or "" for i in range(tok.vocab_size)]
    wordpiece = any(p.startswith("##") for p in pieces)
    starts = np.zeros(len(pieces), bool)
    ends = np.zeros(len(pieces), bool)
    for i, p in enumerate(pieces):
        if not p:
            continue
        if wordpiece:
            starts[i] = not p.startswith("##")
        else:
            starts[i] = p[0] in "▁Ġ \t\n" or not (p[0].isalnum() or p.startswith("<0x"))
            ends[i] = p[-1] in "▁Ġ \t\n" or not (p[-1].isalnum() or p.endswith(">"))
    return starts, ends


def word_starts(tokens: np.ndarray, table: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """bool per token: does it start a word (see :func:`word_start_table`)."""
    starts, ends = table
    prev_ends = np.concatenate([[True], ends[tokens[:-1]]])
    return starts[tokens] | prev_ends
