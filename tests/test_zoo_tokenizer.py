"""tokenizer.json tokenizers through the `tokenizers` library agree with transformers' fast tokenizers,
behind SentencePieceTokenizer's interface; folders with SentencePiece models load as they are."""

import pytest

from podformer.core.errors import UserError
from podformer.data import hf_tokenizer, tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "def hello(world):\n    return world * 2  # doubled",
    "The quick brown fox jumps over the lazy dog.",
    "class Fox(Animal): pass",
    "Ünïcödé and emoji 🙂 survive",
]


def _wordpiece(path):
    """A BERT-style uncased WordPiece tokenizer, trained on the texts and saved as transformers saves it."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TEXTS * 20, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    tok.decoder = decoders.WordPiece()
    fast = transformers.BertTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(path)
    return fast


def _byte_bpe(path):
    """A GPT-2/RoBERTa-style byte-level BPE tokenizer."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )
    fast.save_pretrained(path)
    return fast


@pytest.mark.parametrize("make", [_wordpiece, _byte_bpe])
def test_tokenizer_json_matches_transformers(make, tmp_path):
    fast = make(tmp_path)
    ours = hf_tokenizer.load(str(tmp_path))
    assert isinstance(ours, hf_tokenizer.HFTokenizer)
    assert ours.vocab_size == len(fast)
    for text in TEXTS:
        expected = fast(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == expected
        assert ours.decode(expected) == fast.decode(expected, skip_special_tokens=True)
    assert ours.encode_batch(TEXTS) == [fast(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert ours.pad_id == fast.pad_token_id and ours.mask_id == fast.mask_token_id
    assert ours.bos_id == (fast.bos_token_id if fast.bos_token_id is not None else fast.cls_token_id)
    assert ours.eos_id == (fast.eos_token_id if fast.eos_token_id is not None else fast.sep_token_id)
    # The same file gives the same fingerprint; the tokenizer.json path works as well as its folder.
    assert hf_tokenizer.load(str(tmp_path / "tokenizer.json")).fingerprint == ours.fingerprint


def test_sentencepiece_folders_load_as_they_are(tmp_path):
    proto = tokenizer.train_sentencepiece(TEXTS * 50, vocab_size=400)
    (tmp_path / "spiece.model").write_bytes(proto)  # T5's file name
    tok = hf_tokenizer.load(str(tmp_path))
    assert isinstance(tok, tokenizer.SentencePieceTokenizer)
    assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer.json and no spiece.model"):
        hf_tokenizer.load(str(tmp_path / "empty"))
