"""Hugging Face ``tokenizer.json`` tokenizers (WordPiece, BPE: BERT, GPT-2, RoBERTa) through the
``tokenizers`` library, behind the interface of data.tokenizer.SentencePieceTokenizer; and ``load``,
which opens whichever kind a model folder or file holds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence

from etils import epath

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

        self.path, self._args = path, (tokenizer_json, special_tokens)
        self.tok = Tokenizer.from_str(tokenizer_json)
        special = {k: _content(v) for k, v in (special_tokens or {}).items() if _content(v)}
        self.ids: dict[str, int | None] = {}
        for role, (keys, fallbacks) in _ROLES.items():
            names = [special[k] for k in keys if k in special] + list(fallbacks)
            self.ids[role] = next((i for i in map(self.tok.token_to_id, names) if i is not None), None)
        blob = tokenizer_json + json.dumps(special, sort_keys=True)
        self.fingerprint = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __reduce__(self):  # a copy in another process is built again from the same JSON
        return (HFTokenizer, (*self._args, self.path))

    def worker_spec(self) -> dict:
        """The tokenizer as JSON, for the store builder's worker processes (data/shards.py)."""
        tokenizer_json, special = self._args
        return {"type": "hf", "json": tokenizer_json, "special": special, "path": self.path}

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


# ---------------------------------------------------------------------------------------------------
# Export: a SentencePiece model as the files transformers' AutoTokenizer loads


def sentencepiece_to_tokenizers(model_proto: bytes, frame: tuple[str | None, str | None] = (None, None)):
    """The ``tokenizers.Tokenizer`` that encodes and decodes as the SentencePiece BPE or unigram model
    ``model_proto`` does (podformer's: identity normalisation, no dummy prefix, byte fallback). ``frame``:
    the pieces ``add_special_tokens`` puts before and after a text (e.g. ("<s>", None) for a decoder, as it
    was trained), pairs as ``first A last B last``; a piece the model lacks is left out."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    # Only what podformer's trainer writes converts exactly; a normalising model (NFKC, a dummy prefix, folded
    # whitespace: T5's and LLaMA's own) is refused rather than exported as a tokenizer that encodes differently.
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise UserError(
            f"SentencePiece model with normalizer {norm.name!r} (dummy prefix {norm.add_dummy_prefix}): only "
            "podformer-trained models (identity normalisation) convert to tokenizer.json; ship its .model instead"
        )
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    pieces = list(proto.pieces)
    unk = next(i for i, p in enumerate(pieces) if p.type == Piece.UNKNOWN)
    # Control pieces (<pad>, <s>, </s>) and user-defined ones ("\n", [MASK], sentinels) are whole tokens
    # outside the model's merges, as SentencePiece matches them; the model sees the normal and byte pieces.
    if spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab, _merges(pieces, Piece.NORMAL), unk_token=pieces[unk].piece, byte_fallback=True,
                           fuse_unk=True)  # fmt: skip
    elif spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk, byte_fallback=True)
    else:
        raise UserError(f"SentencePiece model type {spec.model_type} converts to tokenizer.json only as BPE or unigram")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")  # SentencePiece's whitespace escape, nothing else
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    controls = [p.piece for p in pieces if p.type in (Piece.CONTROL, Piece.UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in controls])
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in pieces if p.type == Piece.USER_DEFINED])
    ids = {p.piece: i for i, p in enumerate(pieces)}
    first, last = (p if p in ids else None for p in frame)
    if first or last:
        single = " ".join(filter(None, (first, "$A", last)))
        pair = " ".join(filter(None, (first, "$A", last, "$B:1", last and last + ":1")))
        special = [(p, ids[p]) for p in dict.fromkeys(filter(None, (first, last)))]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return tok


def _merges(pieces, normal: int) -> list[tuple[str, str]]:
    """BPE merges that rebuild SentencePiece's: every split of a piece into two pieces, ranked by the score
    of the piece they make (SentencePiece merges the adjacent pair whose union scores highest)."""
    ids = {p.piece: i for i, p in enumerate(pieces) if p.type == normal}
    ranked = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-pieces[i].score, i, ids[left], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def keep(tok, folder: str) -> None:
    """A copy of ``tok``'s own files in ``folder`` (a workdir's tokenizer/), so that resuming, fine-tuning
    and exporting find the tokenizer the model was trained with; an existing copy is left as it is."""
    dest = epath.Path(folder)
    if dest.exists() or not getattr(tok, "path", ""):
        return
    dest.mkdir(parents=True, exist_ok=True)
    if tok.path.endswith(".json"):
        source = os.path.dirname(tok.path)
        for name in ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
            if os.path.isfile(os.path.join(source, name)):
                (dest / name).write_bytes(epath.Path(source, name).read_bytes())
    else:
        (dest / "tokenizer.model").write_bytes(epath.Path(tok.path).read_bytes())


def export(folder: str, out: str, *, frame: tuple[str | None, str | None], model_max_length: int) -> dict[str, int]:
    """The tokenizer kept in ``folder`` (a workdir's tokenizer/) as files transformers' AutoTokenizer loads,
    written into ``out``; returns its special-token ids as config.json names them (pad/bos/eos_token_id).

    A Hugging Face tokenizer's files are copied as they are. A podformer-trained SentencePiece model becomes
    a tokenizer.json (sentencepiece_to_tokenizers: the same ids for every text) whose ``frame`` makes
    ``tokenizer(text)`` return what the model saw in training; any other SentencePiece model
    is copied with its own files, for the tokenizer class transformers has for it."""
    names = sorted(os.listdir(folder))
    sp_files = [n for n in SENTENCEPIECE_FILES if n in names]
    try:
        tok = load(folder)
    except UserError:  # files podformer cannot read itself still travel with the model, as they are
        tok = None
    ids = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id} if tok else {}
    ids = {k: v for k, v in ids.items() if v is not None and v >= 0}
    os.makedirs(out, exist_ok=True)
    if tok is not None and "tokenizer.json" not in names and sp_files:
        with open(os.path.join(folder, sp_files[0]), "rb") as f:
            proto = f.read()
        try:
            converted = sentencepiece_to_tokenizers(proto, frame)
        except UserError:
            converted = None
        if converted is not None:
            converted.save(os.path.join(out, "tokenizer.json"))
            special = _special_tokens(tok)
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
                      "clean_up_tokenization_spaces": False, **special}  # fmt: skip
            for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
                with open(os.path.join(out, name), "w") as f:
                    json.dump(content, f, indent=2, sort_keys=True)
            return ids
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), os.path.join(out, name))
    return ids


def _special_tokens(tok) -> dict[str, str]:
    """transformers' names for the special pieces a podformer SentencePiece model has."""
    out = {}
    for name, i in (("pad_token", tok.pad_id), ("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if i is not None and i >= 0:
            out[name] = tok.id_to_piece(i)
    for name, pieces in (("unk_token", ("<unk>",)), ("cls_token", ("[CLS]",)), ("sep_token", ("[SEP]",)),
                         ("mask_token", ("[MASK]", "<mask>"))):  # fmt: skip
        found = next((p for p in pieces if tok.piece_to_id(p) is not None), None)
        if found:
            out[name] = found
    return out
