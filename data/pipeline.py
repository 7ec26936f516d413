"""From the ``data`` config section to a tokenizer and train/validation row datasets.

``data.source`` (embedded | tfds | files | mixture) gives documents; ``data.objective`` gives the row
dataset (data/rows.py) and the batch keys:

  causal_lm                        inputs targets segment_ids positions loss_weights      (decoder)
  mlm, roberta, distill            + token_types                                           (encoder)
  mlm_nsp, mlm_sop                 + token_types next_sentence_labels                      (encoder)
  span_corruption, prefix_lm, bart encoder_{inputs,segment_ids,positions}
                                   decoder_{inputs,targets,segment_ids,positions,loss_weights}
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np

from podformer.core.errors import UserError
from podformer.data import corpus, hf_tokenizer, packing, rows, sources, special, store, tokenizer, tokens

OBJECTIVES = tuple(special.OBJECTIVE_TOKENS)
SOURCES = ("embedded", "tfds", "files", "mixture")
_TOKENIZER_SAMPLE = 50_000  # documents a tokenizer is trained on, spread over the split


@dataclasses.dataclass
class Data:
    tokenizer: tokenizer.SentencePieceTokenizer
    train_rows: object
    validation_rows: object
    unigram_entropy: float  # nats per token of the training split; the bar a model must clear
    description: str


def _embedded(data_cfg, vocab_size: int):
    """The foundation's causal-LM path over the embedded corpus (kept byte for byte: same caches)."""
    pct = data_cfg.validation_percent
    fp = corpus.fingerprint(pct)
    tok = hf_tokenizer.get(data_cfg, vocab_size, corpus.NAME, fp, lambda: corpus.documents("train", pct))
    root = os.path.join(tokenizer.cache_dir(data_cfg.cache_dir), "tokens", f"{corpus.NAME}-{fp}-{tok.fingerprint}")
    kw = dict(encoder=tok, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, **_parallel(data_cfg))
    stores = {
        split: tokens.cached(os.path.join(root, split), lambda s=split: corpus.documents(s, pct), name=split, **kw)
        for split in ("train", "validation")
    }
    return tok, stores, f"embedded corpus: Python {corpus.root()} ({stores['train'].num_tokens:,} train tokens)"


def tokenizer_for(data_cfg, vocab_size: int):
    """The tokenizer ``build`` uses for this data section, without reading or tokenizing any split:
    fine-tuning (finetune.py) reuses the tokenizer of the run that pretrained its checkpoint."""
    if data_cfg.source == "embedded" and data_cfg.objective == "causal_lm":
        pct = data_cfg.validation_percent
        return hf_tokenizer.get(
            data_cfg, vocab_size, corpus.NAME, corpus.fingerprint(pct), lambda: corpus.documents("train", pct)
        )
    return _tokenizer(data_cfg, vocab_size, _components(data_cfg), special.OBJECTIVE_TOKENS[data_cfg.objective])


def _components(data_cfg) -> list[tuple[object, float]]:
    kw = dict(
        data_dir=data_cfg.tfds_data_dir,
        text_field=data_cfg.text_field,
        doc_split=data_cfg.doc_split,
        validation_percent=data_cfg.validation_percent,
        cache_dir=data_cfg.cache_dir,
    )
    if data_cfg.source == "embedded":
        return [(sources.Embedded(data_cfg.validation_percent), 1.0)]
    if data_cfg.source == "tfds":
        if not data_cfg.tfds_name:
            raise UserError("data.source=tfds needs data.tfds_name, e.g. c4/en:3.1.0 or wikipedia/20230601.en")
        return [(sources.parse_spec(f"tfds:{data_cfg.tfds_name}", **kw), 1.0)]
    if data_cfg.source == "files":
        if not data_cfg.files:
            raise UserError("data.source=files needs data.files, a folder or glob of .txt/.jsonl/.parquet files")
        return [(sources.parse_spec(f"files:{data_cfg.files}", **kw), 1.0)]
    return sources.parse_mixture(data_cfg.mixture, **kw)


def _split(data_cfg, src, split: str) -> str:
    if isinstance(src, sources.Tfds):
        return data_cfg.train_split if split == "train" else data_cfg.validation_split
    return split


def _sample(docs, n: int):
    """``n`` documents spread over ``docs``, read one at a time (the trainer keeps a bounded sample)."""
    step = max(1, len(docs) // n)
    for i in range(0, min(len(docs), step * n), step):
        yield docs[i]


def _key(src) -> str:
    name = getattr(src, "dataset", None) or getattr(src, "pattern", None) or src.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")[:60]


def _tokenizer(data_cfg, vocab_size: int, components, tokens: special.TokenSet):
    names = "+".join(_key(s) for s, _ in components)
    fp = hashlib.sha256("|".join(f"{s.corpus_fingerprint()}={w}" for s, w in components).encode()).hexdigest()[:16]

    def texts():
        per = max(1, _TOKENIZER_SAMPLE // len(components))
        return (t for s, _ in components for t in _sample(s.documents(_split(data_cfg, s, "train")), per))

    name = corpus.NAME if data_cfg.source == "embedded" else names
    fp = corpus.fingerprint(data_cfg.validation_percent) if data_cfg.source == "embedded" else fp
    return hf_tokenizer.get(data_cfg, vocab_size, name, fp, texts, tokens=tokens)


def _store(data_cfg, src, split: str, tok, *, sentences: bool):
    """The split tokenized once: a sentence store, or (causal LM) a token store with BOS/EOS."""
    sp = _split(data_cfg, src, split)
    kind = "sentences" if sentences else "tokens"
    path = os.path.join(
        tokenizer.cache_dir(data_cfg.cache_dir), kind, f"{_key(src)}-{src.fingerprint(sp)}-{tok.fingerprint}"
    )
    docs = lambda: sources.SplitDocuments(src, sp)  # noqa: E731 (reopened by each worker process)
    kw = dict(encoder=tok, vocab_size=tok.vocab_size, name=f"{src.name} ({sp})", **_parallel(data_cfg))
    if sentences:
        return store.cached(path, docs, **kw)
    return tokens.cached(path, docs, bos_id=tok.bos_id, eos_id=tok.eos_id, **kw)


def _parallel(data_cfg) -> dict:
    """How a store is built here: data.build_workers processes (0: one per core), this host's share."""
    import jax  # here, not above: only a build needs it (the tokenizer command and config checks do not)

    return dict(
        workers=data_cfg.get("build_workers", 0),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _rows(data_cfg, objective: str, st, tok, seq_len: int, seed: int):
    ids = special.special_ids(tok)
    words = special.word_start_table(tok) if data_cfg.whole_word_masking else None
    mlm = dict(
        mlm_probability=data_cfg.mlm_probability,
        max_predictions=data_cfg.max_predictions,
        word_table=words,
        seed=seed,
        dynamic=data_cfg.dynamic_masking,
    )
    if objective == "causal_lm":
        return packing.CausalLMRows(st, seq_len)
    if objective in ("mlm", "distill"):
        ids.require("cls", "sep", what=f"objective {objective}")
        return rows.MLMRows(st, ids, seq_len, cls=ids.cls, sep=ids.sep, **mlm)
    if objective == "roberta":
        return rows.MLMRows(st, ids, seq_len, cls=ids.bos, sep=ids.eos, **mlm)
    if objective in ("mlm_nsp", "mlm_sop"):
        return rows.SentencePairRows(
            st, ids, seq_len, order=objective == "mlm_sop", short_seq_prob=data_cfg.short_seq_prob, **mlm
        )
    kw = dict(seed=seed, dynamic=data_cfg.dynamic_masking)
    if objective == "span_corruption":
        return rows.SpanCorruptionRows(
            st, ids, seq_len, noise_density=data_cfg.noise_density, mean_noise_span=data_cfg.mean_noise_span, **kw
        )
    if objective == "prefix_lm":
        return rows.PrefixLMRows(st, ids, seq_len, **kw)
    return rows.BartRows(st, ids, seq_len, mask_ratio=data_cfg.bart_mask_ratio, word_table=words, **kw)


def _entropy(stores_and_weights) -> float:
    total = None
    for st, w in stores_and_weights:
        counts = tokens.token_counts(st.tokens).astype(np.float64)
        counts = w * counts / counts.sum()
        total = (
            counts
            if total is None
            else np.pad(total, (0, max(0, len(counts) - len(total))))
            + np.pad(counts, (0, max(0, len(total) - len(counts))))
        )
    return tokens.entropy(total)


def build(data_cfg, *, vocab_size: int, seq_len: int, seed: int = 0) -> Data:
    if data_cfg.source not in SOURCES:
        raise UserError(f"data.source={data_cfg.source!r}; choose one of {', '.join(SOURCES)}")
    if data_cfg.objective not in OBJECTIVES:
        raise UserError(f"data.objective={data_cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    objective = data_cfg.objective
    if data_cfg.source == "embedded" and objective == "causal_lm":
        tok, stores, description = _embedded(data_cfg, vocab_size)
        split_rows = {s: packing.CausalLMRows(stores[s], seq_len) for s in stores}
        entropy = stores["train"].unigram_entropy()
    else:
        components = _components(data_cfg)
        tok = _tokenizer(data_cfg, vocab_size, components, special.OBJECTIVE_TOKENS[objective])
        split_rows, parts = {}, []
        for split in ("train", "validation"):
            built = []
            for src, w in components:
                st = _store(data_cfg, src, split, tok, sentences=objective != "causal_lm")
                built.append((_rows(data_cfg, objective, st, tok, seq_len, seed), st, w))
            if len(built) == 1:
                split_rows[split] = built[0][0]
            else:
                split_rows[split] = rows.MixtureRows([b[0] for b in built], [b[2] for b in built])
            if split == "train":
                parts = [(b[1], b[2]) for b in built]
        entropy = _entropy(parts)
        names = ", ".join(f"{s.name} x{w:.2f}" if len(components) > 1 else s.name for s, w in components)
        description = f"{names}; {objective} ({sum(p[0].num_tokens for p in parts):,} train tokens)"
    if tok.vocab_size > vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    for split, r in split_rows.items():
        if len(r) == 0:
            raise UserError(f"the {split} split has no rows of length {seq_len}: the corpus is too small")
    return Data(
        tokenizer=tok,
        train_rows=split_rows["train"],
        validation_rows=split_rows["validation"],
        unigram_entropy=entropy,
        description=description,
    )
