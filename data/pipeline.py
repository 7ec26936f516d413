"""From the ``data`` config section to a tokenizer and train/validation row datasets."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from data import corpus, hf_tokenizer, packing, tokenizer, tokens
from podformer.errors import UserError


@dataclasses.dataclass
class Data:
    tokenizer: tokenizer.SentencePieceTokenizer
    train_rows: object
    validation_rows: object
    unigram_entropy: float  # nats per token of the training split; the bar a model must clear
    description: str


def _embedded(data_cfg, vocab_size: int):
    pct = data_cfg.validation_percent
    fp = corpus.fingerprint(pct)
    tok = hf_tokenizer.get(data_cfg, vocab_size, corpus.NAME, fp, lambda: corpus.documents("train", pct))
    root = os.path.join(tokenizer.cache_dir(data_cfg.cache_dir), "tokens", f"{corpus.NAME}-{fp}-{tok.fingerprint}")
    kw = dict(encode_batch=tok.encode_batch, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    stores = {
        split: tokens.cached(os.path.join(root, split), lambda s=split: corpus.documents(s, pct), **kw)
        for split in ("train", "validation")
    }
    return tok, stores, f"embedded corpus: Python {corpus.root()} ({stores['train'].num_tokens:,} train tokens)"


SOURCES = {"embedded": _embedded}


# ---------------------------------------------------------------------------------------------------
# Rows for the model zoo's simple objectives, so that `train.py --config=configs/<family>.py:tiny` trains
# every family. They are stand-ins, not the papers' objectives (BERT's 80/10/10 MLM, T5's span corruption
# and BART's denoising belong with the data objectives): a fixed 15% of tokens is masked per row.


class SimpleMLMRows(packing.CausalLMRows):
    """Packed rows with 15% of the tokens (never BOS/EOS) replaced by ``mask_id``; the loss is on them."""

    def __init__(self, store, seq_len: int, *, mask_id: int, special_ids: tuple[int, ...], seed: int = 0):
        super().__init__(store, seq_len)
        self.mask_id, self.special_ids, self.seed = mask_id, np.asarray(special_ids, np.int32), seed

    def masked(self, index: int) -> dict[str, np.ndarray]:
        row = super().__getitem__(index)
        tokens = row["inputs"]
        rng = np.random.default_rng((self.seed, int(index)))  # the same masks for a row, epoch after epoch
        pick = (rng.random(tokens.shape) < 0.15) & ~np.isin(tokens, self.special_ids)
        return {**row, "inputs": np.where(pick, self.mask_id, tokens).astype(np.int32), "targets": tokens, "pick": pick}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.masked(index)
        return {
            **{k: row[k] for k in ("inputs", "targets", "segment_ids", "positions")},
            "loss_weights": row["pick"].astype(np.float32),
        }


class SimpleDenoisingRows(SimpleMLMRows):
    """Encoder: the masked row; decoder: the original row, shifted right within each segment (teacher
    forcing from BOS), predicting every token."""

    def __init__(self, store, seq_len: int, *, bos_id: int, **kw):
        super().__init__(store, seq_len, **kw)
        self.bos_id = bos_id

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.masked(index)
        decoder_inputs = np.where(row["positions"] == 0, self.bos_id, np.roll(row["targets"], 1)).astype(np.int32)
        seg, pos = row["segment_ids"], row["positions"]
        return {
            "encoder_inputs": row["inputs"],
            "encoder_segment_ids": seg,
            "encoder_positions": pos,
            "decoder_inputs": decoder_inputs,
            "decoder_targets": row["targets"],
            "decoder_segment_ids": seg,
            "decoder_positions": pos,
            "decoder_loss_weights": (seg > 0).astype(np.float32),
        }


def _rows(objective: str, store, seq_len: int, tok):
    if objective == "causal_lm":
        return packing.CausalLMRows(store, seq_len)
    # A podformer-trained SentencePiece model has no mask token; with byte fallback it never emits UNK, so
    # UNK serves as the mask. Hugging Face vocabularies bring their own ([MASK], <mask>).
    mask_id = getattr(tok, "mask_id", None)
    mask_id = mask_id if mask_id is not None else tokenizer.UNK
    special = tuple(i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None and i >= 0)
    if objective == "simple_mlm":
        return SimpleMLMRows(store, seq_len, mask_id=mask_id, special_ids=special)
    return SimpleDenoisingRows(store, seq_len, mask_id=mask_id, special_ids=special, bos_id=max(tok.bos_id or 0, 0))


OBJECTIVES = ("causal_lm", "simple_mlm", "simple_denoising")


def build(data_cfg, *, vocab_size: int, seq_len: int) -> Data:
    if data_cfg.source not in SOURCES:
        raise UserError(f"data.source={data_cfg.source!r}; choose one of {', '.join(SOURCES)}")
    if data_cfg.objective not in OBJECTIVES:
        raise UserError(f"data.objective={data_cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    tok, stores, description = SOURCES[data_cfg.source](data_cfg, vocab_size)
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    return Data(
        tokenizer=tok,
        train_rows=_rows(data_cfg.objective, stores["train"], seq_len, tok),
        validation_rows=_rows(data_cfg.objective, stores["validation"], seq_len, tok),
        unigram_entropy=stores["train"].unigram_entropy(),
        description=description,
    )
