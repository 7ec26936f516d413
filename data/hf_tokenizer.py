"""Hugging Face ``tokenizer.json`` tokenizers (WordPiece, BPE: BERT, GPT-2, RoBERTa) through the
``tokenizers`` library, behind the interface of data.tokenizer.SentencePieceTokenizer; and ``load``,
which opens whichever kind a model folder or file holds."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from podformer.core.errors import UserError
from podformer.data import tokenizer as sp_tokenizer

SENTENCEPIECE_FILES = ("spiece.model", "sentencepiece.bpe.model", "tokenizer.model")
# Where the special tokens' names come from, and the names to try when a folder does not say.
_ROLES = {
    "pad": (("pad_token",), ("[PAD]", "<pad>", "<|padding|>")),
    "bos": (("bos_token", "cls_token"), ("<s>", "[CLS]", "<|endoftext|>", "<|begin_of_text|>")),
    "eos": (("eos_token", "sep_token"), ("</s>", "[SEP]", "<|endoftext|>", "<|end_of_text|>")),
    "mask": (("mask_token",), ("[MASK]", "<mask>")),
    "unk": (("unk_token",), ("[UNK]", "<unk>", "<|endoftext|>")),
}


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer:
    """A ``tokenizers.Tokenizer``; ``encode`` adds no special tokens (as SentencePieceTokenizer's)."""

    def __init__(self, tokenizer_json: str, special_tokens: dict | None = None, path: str = ""):
        from tokenizers import Tokenizer

        self.path = path
        self.tok = Tokenizer.from_str(tokenizer_json)
        special = {k: _content(v) for k, v in (special_tokens or {}).items() if _content(v)}
        self.ids: dict[str, int | None] = {}
        for role, (keys, fallbacks) in _ROLES.items():
            names = [special[k] for k in keys if k in special] + list(fallbacks)
            self.ids[role] = next((i for i in map(self.tok.token_to_id, names) if i is not None), None)
        blob = tokenizer_json + json.dumps(special, sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> HFTokenizer:
        """``path``: a tokenizer.json file or the folder that holds it (with tokenizer_config.json and/or
        special_tokens_map.json naming the special tokens)."""
        folder, file = (
            (path, os.path.join(path, "tokenizer.json")) if os.path.isdir(path) else (os.path.dirname(path), path)
        )
        if not os.path.isfile(file):
            raise UserError(f"tokenizer {path!r}: no tokenizer.json there; point data.tokenizer at one")
        special: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(folder, name)):
                with open(os.path.join(folder, name)) as f:
                    special.update({k: v for k, v in json.load(f).items() if k.endswith("_token")})
        with open(file, encoding="utf-8") as f:
            text = f.read()
        try:
            return cls(text, special, file)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise UserError(f"tokenizer {file!r} is not a valid tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        # Like SentencePieceTokenizer (0 when the model has none); GPT-2 style vocabularies pad with EOS.
        pad = self.ids["pad"] if self.ids["pad"] is not None else self.ids["eos"]
        return 0 if pad is None else pad

    @property
    def bos_id(self) -> int | None:
        return self.ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.ids["eos"]

    @property
    def mask_id(self) -> int | None:
        return self.ids["mask"]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a whole token (e.g. ``[MASK]``), or None when the vocabulary lacks it."""
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or ""

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and each token's (start, end) character span in ``text``, whitespace trimmed."""
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, sp_tokenizer.trim_offsets(text, enc.offsets)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        # The tokenizers library parallelises batches itself (RAYON_NUM_THREADS), so num_threads is unused.
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def is_hf(path: str) -> bool:
    return path.endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json"))


def load(path: str):
    """The tokenizer at ``path``: a tokenizer.json (or a folder with one) through ``tokenizers``; a
    SentencePiece model (or a folder with spiece.model & co., as T5's) as it is."""
    if is_hf(path):
        return HFTokenizer.load(path)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in SENTENCEPIECE_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise UserError(f"tokenizer folder {path!r} has no tokenizer.json and no {', '.join(SENTENCEPIECE_FILES)}")
        path = found[0]
    return sp_tokenizer.SentencePieceTokenizer.load(path)


def get(data_cfg, vocab_size: int, corpus_name: str, corpus_fingerprint: str, texts_fn, **kwargs):
    """data.tokenizer.get, extended to Hugging Face folders and tokenizer.json files."""
    if data_cfg.tokenizer and (is_hf(data_cfg.tokenizer) or os.path.isdir(data_cfg.tokenizer)):
        return load(data_cfg.tokenizer)
    return sp_tokenizer.get(data_cfg, vocab_size, corpus_name, corpus_fingerprint, texts_fn, **kwargs)
