"""From the ``data`` config section to a tokenizer and train/validation row datasets."""

from __future__ import annotations

import dataclasses
import os

from data import corpus, packing, tokenizer, tokens
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
    tok = tokenizer.get(data_cfg, vocab_size, corpus.NAME, fp, lambda: corpus.documents("train", pct))
    root = os.path.join(tokenizer.cache_dir(data_cfg.cache_dir), "tokens", f"{corpus.NAME}-{fp}-{tok.fingerprint}")
    kw = dict(encode_batch=tok.encode_batch, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    stores = {
        split: tokens.cached(os.path.join(root, split), lambda s=split: corpus.documents(s, pct), **kw)
        for split in ("train", "validation")
    }
    return tok, stores, f"embedded corpus: Python {corpus.root()} ({stores['train'].num_tokens:,} train tokens)"


SOURCES = {"embedded": _embedded}


def build(data_cfg, *, vocab_size: int, seq_len: int) -> Data:
    if data_cfg.source not in SOURCES:
        raise UserError(f"data.source={data_cfg.source!r}; choose one of {', '.join(SOURCES)}")
    if data_cfg.objective != "causal_lm":
        raise UserError(f"data.objective={data_cfg.objective!r}; choose one of causal_lm")
    tok, stores, description = SOURCES[data_cfg.source](data_cfg, vocab_size)
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    return Data(
        tokenizer=tok,
        train_rows=packing.CausalLMRows(stores["train"], seq_len),
        validation_rows=packing.CausalLMRows(stores["validation"], seq_len),
        unigram_entropy=stores["train"].unigram_entropy(),
        description=description,
    )
