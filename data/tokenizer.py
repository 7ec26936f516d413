"""Tokenizers behind one interface; SentencePiece trained on a corpus on first use and cached."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from podformer.errors import UserError

PAD, BOS, EOS, UNK = 0, 1, 2, 3


class SentencePieceTokenizer:
    """A SentencePiece model with ids pad=0, bos=1, eos=2, unk=3 (podformer-trained models)."""

    def __init__(self, model_proto: bytes, path: str = ""):
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        if not os.path.isfile(path):
            raise UserError(
                f"tokenizer file {path!r} does not exist; set data.tokenizer to a SentencePiece .model file, "
                "or to '' to train one on the corpus"
            )
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto, path)
        except RuntimeError as e:
            raise UserError(f"tokenizer file {path!r} is not a SentencePiece model ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return max(self.sp.pad_id(), 0)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _training_chunks(texts: Iterable[str], max_chunks: int, seed: int = 0) -> list[str]:
    # Paragraph-sized pieces (not lines), so that newlines and indentation are learned as pieces.
    chunks = [c[:4000] for t in texts for c in t.split("\n\n") if c.strip()]
    random.Random(seed).shuffle(chunks)
    return chunks[:max_chunks]


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    max_chunks: int = 40_000,
) -> bytes:
    """Train a SentencePiece model that keeps text byte-exact (identity normalisation, whitespace and
    newlines preserved, byte fallback for anything unseen), which code needs."""
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"tokenizer type {model_type!r}: choose bpe or unigram")
    chunks = _training_chunks(texts, max_chunks)
    if not chunks:
        raise UserError("cannot train a tokenizer: the corpus is empty")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n", *user_defined_symbols],
            pad_id=PAD,
            bos_id=BOS,
            eos_id=EOS,
            unk_id=UNK,
            max_sentence_length=16384,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
            hard_vocab_limit=True,
        )
    except RuntimeError as e:
        raise UserError(f"SentencePiece training failed: {str(e).strip().splitlines()[-1]}") from None
    return model.getvalue()


def cache_dir(configured: str = "") -> str:
    return (
        configured or os.environ.get("PODFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "podformer")
    )


def atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def get(data_cfg, vocab_size: int, corpus_name: str, corpus_fingerprint: str, texts_fn) -> SentencePieceTokenizer:
    """``data.tokenizer`` if set; else a tokenizer trained on the corpus, cached by corpus and settings."""
    if data_cfg.tokenizer:
        return SentencePieceTokenizer.load(data_cfg.tokenizer)
    name = f"{corpus_name}-{data_cfg.tokenizer_type}-{vocab_size}-{corpus_fingerprint}.model"
    path = os.path.join(cache_dir(data_cfg.cache_dir), "tokenizers", name)
    if not os.path.exists(path):
        atomic_write(path, train_sentencepiece(texts_fn(), vocab_size, data_cfg.tokenizer_type))
    return SentencePieceTokenizer.load(path)
