"""Pretraining objectives on token arrays: statistics on large samples, reconstruction, reference values."""

import numpy as np
import pytest

from podformer.data import denoising, masking, span_corruption
from podformer.data.packing import pack, shift_right

CLS, SEP, MASK, V = 5, 6, 7, 1000


def _rows(n, length, seed=0):
    rng = np.random.default_rng(seed)
    out = rng.integers(10, V, (n, length)).astype(np.int32)
    out[:, 0], out[:, -1], out[:, length // 2] = CLS, SEP, SEP
    return out


def test_mlm_selects_15_percent_never_specials_and_splits_80_10_10():
    rows = _rows(400, 512)
    rng = np.random.default_rng(1)
    selected = masked = kept = randomised = 0
    for tokens in rows:
        special = np.isin(tokens, [CLS, SEP])
        inputs, targets, weights = masking.mask_tokens(tokens, rng, mask_id=MASK, vocab_size=V, special=special)
        sel = weights > 0
        assert not (sel & special).any() and (inputs[special] == tokens[special]).all()
        assert (targets[sel] == tokens[sel]).all() and (inputs[~sel] == tokens[~sel]).all()
        selected += sel.sum()
        masked += (inputs[sel] == MASK).sum()
        kept += (inputs[sel] == tokens[sel]).sum()
        randomised += ((inputs[sel] != MASK) & (inputs[sel] != tokens[sel])).sum()
    assert abs(selected / rows.size - 0.15) < 0.005
    # A random replacement equals the original with probability 1/V: negligible at V=1000.
    assert abs(masked / selected - 0.8) < 0.01
    assert abs(kept / selected - 0.1) < 0.01
    assert abs(randomised / selected - 0.1) < 0.01


def test_mlm_max_predictions_and_whole_words():
    tokens = _rows(1, 512)[0]
    special = np.isin(tokens, [CLS, SEP])
    rng = np.random.default_rng(0)
    _, _, w = masking.mask_tokens(tokens, rng, mask_id=MASK, vocab_size=V, special=special, max_predictions=20)
    assert w.sum() == 20
    # Words of 1-4 tokens: a word is selected whole or not at all.
    lengths = rng.integers(1, 5, 400)
    word_start = np.zeros(len(tokens), bool)
    word_start[np.cumsum(np.concatenate([[0], lengths]))[np.cumsum(np.concatenate([[0], lengths])) < len(tokens)]] = (
        True
    )
    word_id = np.cumsum(word_start)
    for _ in range(50):
        _, _, w = masking.mask_tokens(tokens, rng, mask_id=MASK, vocab_size=V, special=special, word_start=word_start)
        assert 0 < w.sum() <= round(len(tokens) * 0.15)
        for wid in np.unique(word_id[w > 0]):
            members = (word_id == wid) & ~special
            assert (w[members] > 0).all()


def _document(rng, n_sentences=6):
    """Sentences of increasing ids, so the order of any two pieces can be read off their values."""
    lengths = rng.integers(5, 20, n_sentences)
    return np.split(np.arange(10, 10 + lengths.sum(), dtype=np.int32), np.cumsum(lengths)[:-1])


@pytest.mark.parametrize("order", [False, True])
def test_nsp_and_sop_pairs_are_half_positive_and_well_formed(order):
    rng = np.random.default_rng(0)
    other = rng.integers(2000, 3000, 400).astype(np.int32)  # "another document": ids no chunk uses

    def random_sentences(r, n):
        start = int(r.integers(0, 300))
        return other[start : start + n]

    labels = []
    for _ in range(10_000):
        sentences = _document(rng)
        a, b, label = masking.sentence_pair(
            sentences, rng, max_num_tokens=125, random_sentences=random_sentences, order=order
        )
        assert 0 < len(a) and 0 < len(b) and len(a) + len(b) <= 125
        if label == 1 and not order:
            assert (b >= 2000).all()  # B from the other document
        elif label == 1:  # SOP: the same document's two parts, swapped
            assert b.max() < 2000 and a.min() > b.max()
        else:  # the true continuation
            assert b.max() < 2000 and a.max() < b.min()
        labels.append(label)
    assert abs(np.mean(np.asarray(labels) == 0) - 0.5) < 0.02
    tokens, types = masking.pair_row(a, b, cls_id=CLS, sep_id=SEP)
    assert tokens[0] == CLS and tokens[len(a) + 1] == SEP and tokens[-1] == SEP
    assert (types[: len(a) + 2] == 0).all() and (types[len(a) + 2 :] == 1).all()


def test_random_spans_helper_matches_t5():
    # T5 / Hugging Face's run_t5_mlm_flax: 512 inputs need 568 raw tokens and give 114 targets.
    assert span_corruption.random_spans_helper(512, 0.15, 3.0) == (568, 114)
    assert span_corruption.random_spans_helper(128, 0.15, 3.0)[0] > 128


def test_span_corruption_statistics_exact_lengths_sentinels_and_reconstruction():
    tokens_length, targets_length = span_corruption.random_spans_helper(512, 0.15, 3.0)
    rng = np.random.default_rng(0)
    vocab, eos = 32100, 1
    noise = spans = 0
    for _ in range(1000):
        tokens = rng.integers(2, 32000, tokens_length).astype(np.int32)
        inputs, targets = span_corruption.span_corruption(tokens, rng, vocab_size=vocab, eos_id=eos)
        assert len(inputs) == 512 and len(targets) == targets_length
        assert inputs[-1] == eos and targets[-1] == eos
        in_sent = inputs[inputs >= 32000]
        np.testing.assert_array_equal(in_sent, vocab - 1 - np.arange(len(in_sent)))  # descending from the end
        np.testing.assert_array_equal(targets[targets >= 32000], in_sent)
        np.testing.assert_array_equal(span_corruption.fill_spans(inputs[:-1], targets[:-1], vocab), tokens)
        noise += (targets[:-1] < 32000).sum()
        spans += len(in_sent)
    assert abs(noise / (1000 * tokens_length) - 0.15) < 0.15 * 0.05
    assert abs(noise / spans - 3.0) < 3.0 * 0.05


def test_prefix_lm_splits_uniformly_and_reconstructs():
    rng = np.random.default_rng(0)
    tokens = np.arange(10, 74, dtype=np.int32)
    splits = []
    for _ in range(2000):
        inputs, targets = span_corruption.prefix_lm(tokens, rng, eos_id=1)
        np.testing.assert_array_equal(np.concatenate([inputs[:-1], targets[:-1]]), tokens)
        splits.append(len(inputs) - 1)
    assert min(splits) == 1 and max(splits) == 63 and abs(np.mean(splits) - 32) < 1.5


def test_bart_span_lengths_mask_budget_and_targets():
    rng = np.random.default_rng(0)
    draws = [denoising.poisson_span_lengths(150, rng) for _ in range(400)]
    assert all(d.sum() == 150 for d in draws)  # exactly the masking budget
    lengths = np.concatenate(draws)
    assert abs(lengths.mean() - 3.0) < 0.15 and (lengths == 0).any()
    bos, eos, mask = 1, 2, 4
    removed = masks = 0
    for _ in range(300):
        tokens = rng.integers(10, V, 500).astype(np.int32)
        starts = np.asarray([0, 100, 220, 400])
        src, tgt = denoising.bart_example(
            tokens, starts, rng, bos_id=bos, eos_id=eos, mask_id=mask, vocab_size=V, random_ratio=0.0
        )
        np.testing.assert_array_equal(tgt, np.concatenate([[bos], tokens, [eos]]))  # the original text
        assert src[0] == bos and src[-1] == eos
        masks += (src == mask).sum()
        removed += len(tgt) - (len(src) - (src == mask).sum())
    # Spans of 30% of the words are drawn; they start at distinct words but may overlap (as in fairseq),
    # so a little less than 30% of the text disappears. Each span leaves one mask token behind.
    assert 0.25 < removed / (300 * 500) <= 0.3
    assert 2.5 < removed / masks < 3.5


def test_bart_zero_length_spans_insert_masks_and_sentences_permute():
    tokens = np.arange(10, 2010, dtype=np.int32)
    row = np.concatenate([[1], tokens, [2]])
    inserted = 0
    for seed in range(40):
        # text_infilling draws its span lengths first: the same seed predicts them.
        lengths = denoising.poisson_span_lengths(int(np.ceil(2000 * 0.01)), np.random.default_rng(seed))
        src = denoising.text_infilling(
            row, np.random.default_rng(seed), mask_id=4, vocab_size=V, mask_ratio=0.01, random_ratio=0.0
        )
        zeros = int((lengths == 0).sum())
        assert (src == 4).sum() >= zeros + 1  # one mask per zero-length span, plus the real spans'
        inserted += zeros
        kept = src[src != 4]
        assert np.all(np.diff(kept[1:-1]) > 0) and kept[0] == 1 and kept[-1] == 2  # order kept, nothing invented
    assert inserted > 0
    starts = np.asarray([0, 10, 35, 60])
    perm = denoising.permute_sentences(tokens, starts, np.random.default_rng(3))
    pieces = sorted(tuple(x) for x in np.split(tokens, starts[1:]))
    assert sorted(tuple(x) for x in np.split(perm, np.flatnonzero(np.diff(perm) != 1) + 1)) == pieces
    assert not np.array_equal(perm, tokens)


def test_pack_and_shift_right_keep_examples_apart():
    p = pack([np.asarray([5, 6, 7]), np.asarray([8, 9])], 8)
    np.testing.assert_array_equal(p["tokens"], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(p["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(p["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(shift_right(p["tokens"], p["segment_ids"], 2), [2, 5, 6, 2, 8, 0, 0, 0])
