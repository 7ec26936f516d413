"""Tokenizers behind one interface; SentencePiece trained on a corpus on first use and cached.

python -m podformer.data.tokenizer train --source=embedded --family=bert --vocab-size=8000 --output=bert.model
python -m podformer.data.tokenizer train --source='files:corpus/*.txt' --family=t5 --type=unigram --output=t5.model
python -m podformer.data.tokenizer train --source=tfds:wikipedia/20230601.en --data-dir=gs://b/tfds --family=all ...
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from podformer.core.errors import UserError
from podformer.data import sources, special
from podformer.data.sources import cache_dir  # noqa: F401 (re-exported: callers find the cache here too)

PAD, BOS, EOS, UNK = 0, 1, 2, 3


class SentencePieceTokenizer:
    """A SentencePiece model with ids pad=0, bos=1, eos=2, unk=3 (podformer-trained models)."""

    def __init__(self, model_proto: bytes, path: str = ""):
        self.path, self.proto = path, model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        # "\n" as a user-defined piece is never merged with its neighbours, so a text encodes as its
        # newline-cut pieces do (podformer's models): the store builder cuts long documents there.
        self.newline_is_piece = _is_user_defined(model_proto, "\n")

    def __reduce__(self):  # a copy in another process is the model again (pickling it whole would fail)
        return (SentencePieceTokenizer, (self.proto, self.path))

    def worker_spec(self) -> dict:
        """The model as JSON, for the store builder's worker processes (data/shards.py)."""
        return {"type": "sentencepiece", "model": self.proto.hex(), "path": self.path}

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

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a whole piece (e.g. ``[MASK]``), or None when the vocabulary lacks it."""
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and each token's (start, end) character span in ``text`` (see trim_offsets)."""
        pieces = self.sp.encode_as_proto(text).pieces
        # SentencePiece reports UTF-8 byte offsets into the original (un-normalised) text.
        return [p.id for p in pieces], trim_offsets(text, byte_to_char_spans(text, [(p.begin, p.end) for p in pieces]))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _is_user_defined(model_proto: bytes, piece: str) -> bool:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return any(p.piece == piece and p.type == kind for p in proto.pieces)


def byte_to_char_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """UTF-8 byte spans of ``text`` as character spans; a span edge inside a character widens to cover it
    (byte-fallback pieces of one character share its span)."""
    import bisect

    starts, n = [], 0
    for ch in text:
        starts.append(n)
        n += len(ch.encode("utf-8"))
    starts.append(n)
    return [(bisect.bisect_right(starts, b) - 1, bisect.bisect_left(starts, e)) for b, e in spans]


def trim_offsets(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans without their leading/trailing whitespace (SentencePiece's ``▁`` and byte-level BPE's ``Ġ``
    carry the space before a word), as Hugging Face's ``trim_offsets``; all-space tokens keep theirs."""
    out = []
    for b, e in spans:
        tb, te = b, e
        while tb < te and text[tb].isspace():
            tb += 1
        while te > tb and text[te - 1].isspace():
            te -= 1
        out.append((tb, te) if tb < te else (b, e))
    return out


RESERVOIR = 4  # chunks kept while streaming, in units of max_chunks


def _training_chunks(texts: Iterable[str], max_chunks: int, seed: int = 0) -> list[str]:
    """``max_chunks`` paragraph-sized pieces (not lines, so that newlines and indentation are learned as
    pieces), sampled uniformly from any number of texts in bounded memory: a reservoir of
    ``RESERVOIR * max_chunks`` pieces of at most 4,000 characters (Vitter's algorithm R, seeded), then
    shuffled. A corpus with fewer pieces than the reservoir gets exactly the sample it always had."""
    cap, rng = RESERVOIR * max_chunks, random.Random(seed + 1)
    reservoir: list[str] = []
    seen = 0
    for t in texts:
        for c in t.split("\n\n"):
            if not c.strip():
                continue
            if len(reservoir) < cap:
                reservoir.append(c[:4000])
            else:
                j = rng.randrange(seen + 1)
                if j < cap:
                    reservoir[j] = c[:4000]
            seen += 1
    random.Random(seed).shuffle(reservoir)
    return reservoir[:max_chunks]


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (),
    max_chunks: int = 40_000,
    extra_ids: int = 0,
) -> bytes:
    """Train a SentencePiece model that keeps text byte-exact (identity normalisation, whitespace and
    newlines preserved, byte fallback for anything unseen), which code needs.

    ``user_defined_symbols`` (e.g. [CLS], [SEP], [MASK]) get ids right after the control tokens and are
    never split; ``extra_ids`` T5 sentinels are appended at the END of the vocabulary, ``<extra_id_0>``
    last, so that ``vocab_size`` counts them and span corruption counts down from ``vocab_size - 1``."""
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
            vocab_size=vocab_size - extra_ids,
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
    return append_sentinels(model.getvalue(), extra_ids) if extra_ids else model.getvalue()


def append_sentinels(model_proto: bytes, n: int) -> bytes:
    """``<extra_id_{n-1}> ... <extra_id_0>`` appended as user-defined pieces (encoded whole, never split)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    for i in reversed(range(n)):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<extra_id_{i}>", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def atomic_write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


GPT = special.TOKEN_SETS["gpt"]


def get(
    data_cfg,
    vocab_size: int,
    corpus_name: str,
    corpus_fingerprint: str,
    texts_fn,
    tokens: special.TokenSet = GPT,
) -> SentencePieceTokenizer:
    """``data.tokenizer`` if set; else a tokenizer trained on the corpus with the special ``tokens`` (default:
    GPT's, none), cached by corpus and settings (GPT's name has no tag: existing caches and hashes hold)."""
    if data_cfg.tokenizer:
        return SentencePieceTokenizer.load(data_cfg.tokenizer)
    tag = "" if tokens.name == "gpt" else f"-{tokens.name}"
    name = f"{corpus_name}-{data_cfg.tokenizer_type}-{vocab_size}{tag}-{corpus_fingerprint}.model"
    path = os.path.join(cache_dir(data_cfg.cache_dir), "tokenizers", name)
    if not os.path.exists(path):
        proto = train_sentencepiece(
            texts_fn(),
            vocab_size,
            data_cfg.tokenizer_type,
            user_defined_symbols=tokens.symbols,
            extra_ids=tokens.sentinels,
        )
        atomic_write(path, proto)
    return SentencePieceTokenizer.load(path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m podformer.data.tokenizer train ...``: train a SentencePiece model on any source."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m podformer.data.tokenizer", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a SentencePiece unigram or BPE model")
    t.add_argument("--source", default="embedded", help="embedded | tfds:NAME[:VERSION] | files:GLOB_OR_FOLDER")
    t.add_argument("--data-dir", default="", help="TFDS data_dir (local or gs://)")
    t.add_argument("--split", default="train")
    t.add_argument("--text-field", default="text", help="TFDS text feature / .jsonl and .parquet text field")
    # The token sets are named after the families whose objectives use them (model/families.py).
    t.add_argument("--family", default="gpt", choices=sorted(special.TOKEN_SETS), help="special tokens: whose")
    t.add_argument("--type", default="unigram", choices=("unigram", "bpe"))
    t.add_argument("--vocab-size", type=int, default=32000, help="total, sentinels included")
    t.add_argument("--max-documents", type=int, default=200_000, help="documents sampled for training")
    t.add_argument("--output", required=True, help="where to write the .model file")
    args = parser.parse_args(argv)
    try:
        docs = sources.parse_spec(args.source, data_dir=args.data_dir, text_field=args.text_field).documents(args.split)
        step = max(1, len(docs) // args.max_documents)
        proto = train_sentencepiece(
            (docs[i] for i in range(0, len(docs), step)),
            args.vocab_size,
            args.type,
            user_defined_symbols=special.TOKEN_SETS[args.family].symbols,
            extra_ids=special.TOKEN_SETS[args.family].sentinels,
            max_chunks=max(40_000, args.max_documents),
        )
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        sys.exit(2)
    atomic_write(os.path.abspath(args.output), proto)
    tok = SentencePieceTokenizer(proto, args.output)
    print(f"wrote {args.output}: {tok.vocab_size} pieces, fingerprint {tok.fingerprint}, {special.special_ids(tok)}")


if __name__ == "__main__":
    main()
