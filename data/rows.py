"""Random-access row datasets, one per pretraining objective, over a sentence store.

Design. ``rows[i]`` is deterministic: a planned slice of the store (data/plans.py) plus its index.
``rows.transform(example, rng)`` applies the objective's randomness and returns the final row, a dict
of fixed-shape numpy arrays in the one key schema (data/packing.py). The loader applies ``transform``
with grain's ``random_map`` AFTER shuffling and repeating, so the rng comes from the row's position in
the global stream, epoch included: new masks every epoch (RoBERTa's dynamic masking), identical on any
host and any number of hosts, and exactly reproduced on resume. With ``dynamic=False`` the rng comes
from (seed, row index) instead: BERT's static masks, the same every epoch.

Packing. Fixed-length objectives fill rows exactly (T5 span corruption: ``random_spans_helper``
tokens per row; RoBERTa FULL-SENTENCES: sentences across documents). Variable-length ones (BART,
prefix LM) are packed with a plan of consecutive examples whose *static* lengths fit the row -- the
noise never lengthens an example past what the plan reserved (a prefix-LM split keeps its length; a
BART source longer than its target is cut) -- so packing stays random access. Each packed example is a
segment: segment ids 1.., positions restarting at 0, decoder inputs shifted within the segment.
"""

from __future__ import annotations

import numpy as np

from podformer.data import denoising, masking, packing, plans, span_corruption
from podformer.data.special import SpecialIds, word_starts
from podformer.data.store import SentenceStore


class _Rows:
    """Shared: length, static/dynamic rng."""

    def __init__(self, store: SentenceStore, *, seed: int = 0, dynamic: bool = True):
        self.store, self.seed, self.dynamic = store, seed, dynamic

    def __len__(self) -> int:
        return self._len

    def _check(self, index: int) -> int:
        if not 0 <= index < self._len:
            raise IndexError(index)
        return int(index)

    def _rng(self, example, rng):
        return rng if self.dynamic else np.random.default_rng([self.seed, int(example["index"])])


def _encoder_row(tokens, types, targets, weights, length: int) -> dict[str, np.ndarray]:
    p = packing.pack([tokens], length)
    pad = lambda x, dtype: np.pad(np.asarray(x, dtype), (0, length - len(x)))  # noqa: E731
    return {
        "inputs": p["tokens"],
        "targets": pad(targets, np.int32),
        "loss_weights": pad(weights, np.float32),
        "segment_ids": p["segment_ids"],
        "positions": p["positions"],
        "token_types": pad(types, np.int32),
    }


class MLMRows(_Rows):
    """Masked LM on FULL-SENTENCES rows (RoBERTa): ``[CLS] s1 s2 .. [SEP] t1 t2 .. [SEP]`` -- sentences
    packed contiguously across documents, a separator between documents, one sequence per row.
    Objectives mlm (BERT without NSP), roberta (dynamic masks, <s>/</s>) and distill."""

    def __init__(self, store, ids: SpecialIds, seq_len: int, *, cls: int, sep: int, mlm_probability=0.15,
                 max_predictions=0, word_table=None, **kw):  # fmt: skip
        super().__init__(store, **kw)
        ids.require("mask", what="masked LM")
        self.ids, self.seq_len, self.cls, self.sep = ids, seq_len, cls, sep
        self.mlm_probability, self.max_predictions, self.word_table = mlm_probability, max_predictions, word_table
        self.special = ids.special_mask()
        self.bounds = plans.cached(
            store, f"full-{seq_len}", lambda: plans.token_rows(store, seq_len - 2, cross_documents=True)
        )
        self._len = len(self.bounds) - 1

    def __getitem__(self, index):
        i = self._check(index)
        s, e = int(self.bounds[i]), int(self.bounds[i + 1])
        docs = self.store.doc_starts
        inner = docs[(docs > s) & (docs < e)] - s
        body = np.insert(self.store.token_range(s, e), inner, self.sep)
        return {"index": np.int64(i), "tokens": np.concatenate([[self.cls], body, [self.sep]]).astype(np.int32)}

    def transform(self, example, rng):
        tokens = example["tokens"]
        inputs, targets, weights = self._mask(tokens, self._rng(example, rng))
        return _encoder_row(inputs, np.zeros(len(tokens), np.int32), targets, weights, self.seq_len)

    def _mask(self, tokens, rng):
        words = None
        if self.word_table is not None:
            words = word_starts(tokens, self.word_table)
        return masking.mask_tokens(
            tokens, rng, mask_id=self.ids.mask, vocab_size=self.ids.vocab_size,
            special=self.special[tokens], word_start=words, mlm_probability=self.mlm_probability,
            max_predictions=self.max_predictions,
        )  # fmt: skip


class SentencePairRows(MLMRows):
    """BERT's MLM + NSP (``order=False``) or ALBERT's MLM + SOP (``order=True``): one sentence pair per
    row, ``[CLS] A [SEP] B [SEP]``, ``token_types`` 0/1 and ``next_sentence_labels`` (0: B follows A)."""

    def __init__(self, store, ids: SpecialIds, seq_len: int, *, order: bool = False, short_seq_prob=0.1, **kw):
        _Rows.__init__(self, store, seed=kw.pop("seed", 0), dynamic=kw.pop("dynamic", True))
        ids.require("cls", "sep", "mask", what="MLM with sentence pairs")
        self.ids, self.seq_len, self.cls, self.sep = ids, seq_len, ids.cls, ids.sep
        self.mlm_probability = kw.pop("mlm_probability", 0.15)
        self.max_predictions = kw.pop("max_predictions", 0)
        self.word_table = kw.pop("word_table", None)
        self.order, self.short_seq_prob = order, short_seq_prob
        self.special = ids.special_mask()
        self.chunks = plans.cached(store, f"pairs-{seq_len}", lambda: plans.sentence_chunks(store, seq_len - 3))
        self._len = len(self.chunks)

    def __getitem__(self, index):
        i = self._check(index)
        a, b = (int(x) for x in self.chunks[i])
        return {"index": np.int64(i), "sentences": (a, b), "doc": int(self.store.doc_of_sentence(a))}

    def _random_sentences(self, doc: int):
        store = self.store

        def take(rng, target_length: int) -> np.ndarray:
            # BERT: a random other document (10 tries), from a random sentence, until the target length.
            other = doc
            for _ in range(10):
                other = int(rng.integers(0, store.num_docs))
                if other != doc:
                    break
            first, end = int(store.doc_first_sentence[other]), int(store.doc_first_sentence[other + 1])
            start = int(rng.integers(first, end))
            stop = int(np.searchsorted(store.sent_starts, store.sent_starts[start] + target_length, side="left"))
            return store.token_range(
                int(store.sent_starts[start]), int(store.sent_starts[min(max(stop, start + 1), end)])
            )

        return take

    def transform(self, example, rng):
        rng = self._rng(example, rng)
        a, b = example["sentences"]
        ta, tb, label = masking.sentence_pair(
            self.store.sentences(a, b), rng, max_num_tokens=self.seq_len - 3,
            random_sentences=self._random_sentences(example["doc"]), order=self.order,
            short_seq_prob=self.short_seq_prob,
        )  # fmt: skip
        tokens, types = masking.pair_row(ta, tb, cls_id=self.cls, sep_id=self.sep)
        inputs, targets, weights = self._mask(tokens, rng)
        row = _encoder_row(inputs, types, targets, weights, self.seq_len)
        row["next_sentence_labels"] = np.int32(label)
        return row


def _seq2seq_row(sources, targets, enc_len: int, dec_len: int, start_id: int) -> dict[str, np.ndarray]:
    """Packed encoder-decoder row; an example whose source no longer fits is dropped from both sides
    (so segment k of the decoder always has segment k of the encoder to attend to)."""
    keep, used = 0, 0
    for s in sources:
        if used >= enc_len:
            break
        used += len(s)
        keep += 1
    enc = packing.pack(sources[:keep], enc_len)
    dec = packing.pack(targets[:keep], dec_len)
    return {
        "encoder_inputs": enc["tokens"],
        "encoder_segment_ids": enc["segment_ids"],
        "encoder_positions": enc["positions"],
        "decoder_inputs": packing.shift_right(dec["tokens"], dec["segment_ids"], start_id),
        "decoder_targets": dec["tokens"],
        "decoder_segment_ids": dec["segment_ids"],
        "decoder_positions": dec["positions"],
        "decoder_loss_weights": (dec["segment_ids"] > 0).astype(np.float32),
    }


class SpanCorruptionRows(_Rows):
    """T5 span corruption: row i = raw tokens [i*T, (i+1)*T) of the documents concatenated (T5's
    ``reduce_concat_tokens`` + ``split_tokens``), T from ``random_spans_helper`` so that the inputs fill
    ``inputs_length`` exactly; targets are ``targets_length`` long."""

    def __init__(self, store, ids: SpecialIds, inputs_length: int, *, noise_density=0.15, mean_noise_span=3.0, **kw):
        super().__init__(store, **kw)
        ids.require("eos", "num_sentinels", what="span corruption")
        self.ids, self.inputs_length = ids, inputs_length
        self.noise_density, self.mean_noise_span = noise_density, mean_noise_span
        self.tokens_length, self.targets_length = span_corruption.random_spans_helper(
            inputs_length, noise_density, mean_noise_span
        )
        self._len = store.num_tokens // self.tokens_length

    def __getitem__(self, index):
        i = self._check(index)
        t = self.tokens_length
        return {"index": np.int64(i), "tokens": self.store.token_range(i * t, (i + 1) * t)}

    def transform(self, example, rng):
        inputs, targets = span_corruption.span_corruption(
            example["tokens"], self._rng(example, rng), vocab_size=self.ids.vocab_size, eos_id=self.ids.eos,
            noise_density=self.noise_density, mean_noise_span_length=self.mean_noise_span,
        )  # fmt: skip
        return _seq2seq_row([inputs], [targets], self.inputs_length, self.targets_length, self.ids.pad)


class PrefixLMRows(_Rows):
    """T5's prefix LM: documents cut into pieces of ``seq_len - 1`` tokens (``split_tokens``), each split
    at a uniformly random point into inputs and targets (EOS each). Consecutive pieces are packed while
    their lengths sum to at most ``seq_len``, which bounds both the inputs and the targets."""

    def __init__(self, store, ids: SpecialIds, seq_len: int, **kw):
        super().__init__(store, **kw)
        ids.require("eos", what="prefix LM")
        self.ids, self.seq_len = ids, seq_len
        self.chunks = plans.cached(store, f"fixed-{seq_len - 1}", lambda: plans.fixed_chunks(store, seq_len - 1))
        self.groups = plans.cached(
            store,
            f"prefix-groups-{seq_len}",
            lambda: plans.greedy_groups(self.chunks[:, 1] - self.chunks[:, 0], seq_len),
        )
        self._len = len(self.groups) - 1

    def __getitem__(self, index):
        i = self._check(index)
        chunks = self.chunks[self.groups[i] : self.groups[i + 1]]
        return {"index": np.int64(i), "pieces": [self.store.token_range(int(s), int(e)) for s, e in chunks]}

    def transform(self, example, rng):
        rng = self._rng(example, rng)
        pairs = [span_corruption.prefix_lm(p, rng, eos_id=self.ids.eos) for p in example["pieces"]]
        return _seq2seq_row([p[0] for p in pairs], [p[1] for p in pairs], self.seq_len, self.seq_len, self.ids.pad)


class BartRows(_Rows):
    """BART denoising: documents cut into blocks of whole sentences of at most ``seq_len - 2`` tokens
    (fairseq's ``complete_doc`` blocks), consecutive blocks packed while ``<s> block </s>`` fit; each
    block's sentences permuted, then text infilling. Targets are the original ``<s> block </s>``."""

    def __init__(self, store, ids: SpecialIds, seq_len: int, *, mask_ratio=0.3, poisson_lambda=3.0,
                 random_ratio=0.1, permute=True, word_table=None, **kw):  # fmt: skip
        super().__init__(store, **kw)
        ids.require("bos", "eos", "mask", what="BART denoising")
        self.ids, self.seq_len, self.permute, self.word_table = ids, seq_len, permute, word_table
        self.infill = dict(mask_ratio=mask_ratio, poisson_lambda=poisson_lambda, random_ratio=random_ratio)
        self.bounds = plans.cached(
            store, f"blocks-{seq_len - 2}", lambda: plans.token_rows(store, seq_len - 2, cross_documents=False)
        )
        self.groups = plans.cached(
            store, f"bart-groups-{seq_len}", lambda: plans.greedy_groups(np.diff(self.bounds) + 2, seq_len)
        )
        self._len = len(self.groups) - 1

    def __getitem__(self, index):
        i = self._check(index)
        blocks = []
        for k in range(int(self.groups[i]), int(self.groups[i + 1])):
            s, e = int(self.bounds[k]), int(self.bounds[k + 1])
            st = self.store.sent_starts
            starts = st[(st > s) & (st < e)] - s
            blocks.append((self.store.token_range(s, e), np.concatenate([[0], starts]).astype(np.int64)))
        return {"index": np.int64(i), "blocks": blocks}

    def transform(self, example, rng):
        rng = self._rng(example, rng)
        sources, targets = [], []
        for tokens, starts in example["blocks"]:
            words = None
            if self.word_table is not None:
                words = word_starts(np.concatenate([[self.ids.bos], tokens, [self.ids.eos]]), self.word_table)
            src, tgt = denoising.bart_example(
                tokens, starts, rng, bos_id=self.ids.bos, eos_id=self.ids.eos, mask_id=self.ids.mask,
                vocab_size=self.ids.vocab_size, permute=self.permute, word_start=words, **self.infill,
            )  # fmt: skip
            sources.append(src)
            targets.append(tgt)
        return _seq2seq_row(sources, targets, self.seq_len, self.seq_len, self.ids.eos)


class MixtureRows:
    """Rows of several row datasets of the same objective, interleaved in proportion to ``weights``
    (grain's deterministic selection map: random access, the same on every host). Its length is where
    the first component runs out; the loader's repeat then starts the next epoch."""

    def __init__(self, components, weights):
        import grain

        self.components = list(components)
        tagged = [grain.MapDataset.source(_Tagged(c, k)) for k, c in enumerate(self.components)]
        self.mixed = grain.MapDataset.mix(tagged, list(weights))
        if hasattr(self.components[0], "transform"):
            self.transform = _ComponentTransform(self.components)

    def __len__(self) -> int:
        return len(self.mixed)

    def __getitem__(self, index):
        return self.mixed[index]


class _Tagged:
    def __init__(self, rows, k: int):
        self.rows, self.k = rows, k

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        example = self.rows[index]
        return {**example, "component": self.k} if hasattr(self.rows, "transform") else example


class _ComponentTransform:
    """The transform of the component each example came from (their settings may differ)."""

    def __init__(self, components):
        self.components = components

    def __call__(self, example, rng):
        k = example.pop("component")
        if not self.components[k].dynamic:  # static masks: keep components' rngs apart
            example["index"] = np.int64(example["index"] * len(self.components) + k)
        return self.components[k].transform(example, rng)
