"""Extractive QA: token offsets (SentencePiece and tokenizer.json), doc-stride windows over contexts longer
than a window, answers that cross window edges, n-best decoding and SQuAD v2 no-answers, all checked
against character spans the test computes from the text itself."""

import numpy as np
import pytest

from podformer.core.errors import UserError
from podformer.data import hf_tokenizer, tokenizer
from podformer.data.tasks import qa

PAD, UNK, CLS, SEP = 0, 1, 2, 3


def _context(n_words: int):
    """A context of n tokens with varied gaps and punctuation, and each token's (start, end) in it."""
    text, spans, tokens = "", [], []
    for i in range(n_words):
        token = "." if i % 7 == 6 else f"w{i}"
        gap = "" if token == "." or not text else ("  " if i % 5 == 0 else " ")
        text += gap
        spans.append((len(text), len(text) + len(token)))
        tokens.append(token)
        text += token
    return text, spans, tokens


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer.json tokenizer: one token per word or punctuation mark."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", "who", "is", "it", "Ada", "Lovelace", "wrote", "notes"]
    words += [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return hf_tokenizer.HFTokenizer(tok.to_str(), {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})


def _windows(tok, examples, training, max_len=24, doc_stride=6):
    return qa.make_windows(examples, tok, max_len=max_len, doc_stride=doc_stride, max_query_len=8, cls_id=CLS,
                           sep_id=SEP, pad_id=PAD, training=training)  # fmt: skip


def test_windows_cover_a_long_context_with_the_doc_stride(word_tokenizer):
    text, spans, tokens = _context(60)
    ex = {"id": "a", "question": " who is it", "context": text, "answers": {"text": [], "answer_start": []}}
    w = _windows(word_tokenizer, [ex], training=False)
    head, room = 5, 24 - 5 - 1  # [CLS] who is it [SEP]; context; [SEP]
    begins = [0, 12, 24, 36, 48]  # consecutive windows share doc_stride = 6 tokens
    assert w["input_ids"].shape == (5, 24) and w["offsets"].shape == (5, 24, 2)
    assert list(w["example_index"]) == [0] * 5
    ids = [word_tokenizer.piece_to_id(t) for t in tokens]
    for row, begin in enumerate(begins):
        end = min(begin + room, 60)
        n = head + end - begin + 1
        assert list(w["input_ids"][row, :head]) == [
            CLS,
            *(word_tokenizer.piece_to_id(q) for q in "who is it".split()),
            SEP,
        ]
        assert list(w["input_ids"][row, head : n - 1]) == ids[begin:end] and w["input_ids"][row, n - 1] == SEP
        assert list(w["attention_mask"][row]) == [1] * n + [0] * (24 - n)
        assert list(w["token_type_ids"][row]) == [0] * head + [1] * (n - head) + [0] * (24 - n)
        assert w["offsets"][row, head : n - 1].tolist() == [list(s) for s in spans[begin:end]]
        assert (w["offsets"][row, :head] == -1).all() and (w["offsets"][row, n - 1 :] == -1).all()


def test_answers_crossing_a_window_edge_train_and_decode_to_their_characters(word_tokenizer):
    text, spans, tokens = _context(60)
    s_char, e_char = spans[15][0], spans[20][1]  # tokens 15..20: window 0 holds 0..19, window 1 14..33
    answer = text[s_char:e_char]
    long_ex = {
        "id": "long",
        "question": "who",
        "context": text,
        "answers": {"text": [answer], "answer_start": [s_char]},
    }
    short = "Ada Lovelace wrote notes."
    short_ex = {"id": "short", "question": "who", "context": short,
                "answers": {"text": ["notes."], "answer_start": [19]}}  # fmt: skip
    train = _windows(word_tokenizer, [long_ex, short_ex], training=True)
    head = 3  # [CLS] who [SEP]
    assert list(train["example_index"]) == [0, 0, 0, 0, 1]  # room 20, stride 6: begins 0, 14, 28, 42
    # Only the window holding the whole answer points at it; the others at [CLS].
    assert list(zip(train["start_positions"], train["end_positions"], strict=True)) == [
        (0, 0), (head + 15 - 14, head + 20 - 14), (0, 0), (0, 0), (head + 3, head + 4)]  # fmt: skip
    ids = train["input_ids"]
    assert word_tokenizer.id_to_piece(ids[1, head + 1]) == tokens[15]
    assert word_tokenizer.id_to_piece(ids[1, head + 6]) == tokens[20]

    ev = _windows(word_tokenizer, [long_ex, short_ex], training=False)
    rng = np.random.default_rng(0)
    start, end = rng.uniform(-1, 0, ev["input_ids"].shape), rng.uniform(-1, 0, ev["input_ids"].shape)
    start[1, head + 1], end[1, head + 6] = 5, 5  # the answer, in window 1
    start[0, 1], end[0, 1] = 20, 20  # a question token: not a span
    start[2, head + 10], end[2, head + 9] = 6, 6  # end before start
    start[0, head + 2], end[0, head + 15] = 7, 7  # 14 tokens: longer than max_answer_len
    start[4, head + 3], end[4, head + 4] = 3, 3  # "notes" "." in the short context
    got = qa.decode_answers([long_ex, short_ex], ev, start, end, max_answer_len=10)
    assert got == {"long": answer, "short": "notes."}
    assert answer == "w15 w16 w17 w18 w19."  # what the spans above select, by construction of _context


def test_no_answer_examples_train_on_cls_and_decode_empty_past_the_null_threshold(word_tokenizer):
    text, spans, _ = _context(40)
    ex = {"id": "q", "question": "who", "context": text, "answers": {"text": [], "answer_start": []}}
    train = _windows(word_tokenizer, [ex], training=True)
    assert (
        len(train["start_positions"]) == 3 and not train["start_positions"].any() and not train["end_positions"].any()
    )
    ev = _windows(word_tokenizer, [ex], training=False)
    start, end = np.zeros(ev["input_ids"].shape), np.zeros(ev["input_ids"].shape)
    start[:, 0] = end[:, 0] = 5  # null score 10 in both windows
    start[1, 3 + 30 - 14], end[1, 3 + 31 - 14] = 3, 3  # best span: tokens 30..31, score 6
    span = text[spans[30][0] : spans[31][1]]
    assert qa.decode_answers([ex], ev, start, end, version_2=True) == {"q": ""}
    assert qa.decode_answers([ex], ev, start, end, version_2=True, null_threshold=4.5) == {"q": span}
    assert qa.decode_answers([ex], ev, start, end) == {"q": span}  # v1.1 always answers
    start[0, 0] = end[0, 0] = -5  # the lowest null score over the windows counts: -10 < 6
    assert qa.decode_answers([ex], ev, start, end, version_2=True) == {"q": span}
    with pytest.raises(UserError, match="max_len 10 leaves 6 context tokens.*not more than doc_stride 6"):
        _windows(word_tokenizer, [ex], training=True, max_len=10)


TEXTS = ["Ünïcödé naïve café, the quick brown fox jumps over the lazy dog."] * 40


def test_sentencepiece_offsets_are_character_spans_and_round_trip_answers():
    tok = tokenizer.SentencePieceTokenizer(tokenizer.train_sentencepiece(TEXTS, vocab_size=300))
    context = "Zoë saw the café 🙂 and  Ünïcödé foxes."  # 🙂 and ë are unseen: byte-fallback pieces
    ids, offsets = tok.encode_with_offsets(context)
    assert ids == tok.encode(context)
    for i, (b, e) in zip(ids, offsets, strict=True):
        surface = tok.decode([i])
        if surface.strip() and not tok.id_to_piece(i).startswith("<0x"):
            assert context[b:e] == surface.strip()
    assert offsets[-1][1] == len(context)
    answers = ["café 🙂", "Zoë", "Ünïcödé foxes."]
    examples = [
        {
            "id": str(k),
            "question": "what",
            "context": context,
            "answers": {"text": [a], "answer_start": [context.index(a)]},
        }
        for k, a in enumerate(answers)
    ]
    train = qa.make_windows(examples, tok, max_len=64, doc_stride=8, max_query_len=8, cls_id=1, sep_id=2, pad_id=0,
                            training=True)  # fmt: skip
    ev = qa.make_windows(examples, tok, max_len=64, doc_stride=8, max_query_len=8, cls_id=1, sep_id=2, pad_id=0,
                         training=False)  # fmt: skip
    start, end = np.zeros(ev["input_ids"].shape), np.zeros(ev["input_ids"].shape)
    rows = np.arange(len(examples))
    start[rows, train["start_positions"]], end[rows, train["end_positions"]] = 9, 9
    assert qa.decode_answers(examples, ev, start, end) == {str(k): a for k, a in enumerate(answers)}


def test_tokenizer_json_offsets_equal_transformers_offset_mapping():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=80, special_tokens=["[PAD]", "[UNK]"]))
    fast = transformers.BertTokenizerFast(tokenizer_object=tok)
    ours = hf_tokenizer.HFTokenizer(tok.to_str())
    for text in ["Ünïcödé  naïve Café, the QUICK fox!", "jumps over  the lazy dog."]:
        ref = fast(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ours.encode_with_offsets(text) == (ref["input_ids"], [tuple(o) for o in ref["offset_mapping"]])
