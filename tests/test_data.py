"""Embedded corpus, tokenizer, token store, packed rows and the grain loader."""

import jax
import numpy as np
import pytest

from podformer.configs.common import RULES
from podformer.core.errors import UserError
from podformer.data import corpus, packing, tokenizer, tokens
from podformer.data.loader import Loader


def _store(tmp_path, docs):
    return tokens.build(
        str(tmp_path / "store"),
        docs,
        lambda texts: [[int(w) for w in t.split()] for t in texts],
        vocab_size=100,
        bos_id=1,
        eos_id=2,
    )


def test_embedded_corpus_is_the_standard_library_split_by_file():
    files = corpus.files()
    assert any(f == "json/decoder.py" or f.endswith("json/decoder.py") for f in files)
    assert not any("site-packages" in f for f in files)
    splits = {f: corpus.split_of(f, 3) for f in files}
    share = sum(s == "validation" for s in splits.values()) / len(files)
    assert 0.01 < share < 0.06
    assert splits == {f: corpus.split_of(f, 3) for f in files}  # deterministic


def test_tokenizer_is_byte_exact_on_code(tmp_path):
    text = "def f(x):\n    return {'a': x ** 2}  # ünïcode\n\n\tclass A: pass\n"
    proto = tokenizer.train_sentencepiece([text * 50, "import os\nprint(os.sep)\n" * 50], vocab_size=300)
    tok = tokenizer.SentencePieceTokenizer(proto)
    assert tok.decode(tok.encode(text)) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    with pytest.raises(UserError, match="does not exist"):
        tokenizer.SentencePieceTokenizer.load(str(tmp_path / "missing.model"))


def test_causal_rows_pack_documents_with_segments_and_restarting_positions(tmp_path):
    docs = ["10 11 12", "20 21 22 23 24 25 26", "30", "40 41 42 43"]
    store = _store(tmp_path, docs)
    stream = np.asarray(store.tokens)
    rows = packing.CausalLMRows(store, seq_len=6)
    seen_targets = []
    for i in range(len(rows)):
        r = rows[i]
        start = i * 6
        np.testing.assert_array_equal(r["inputs"], stream[start : start + 6])
        np.testing.assert_array_equal(r["targets"], stream[start + 1 : start + 7])
        doc = store.doc_of(np.arange(start, start + 7))
        for t in range(6):
            same = doc[t] == doc[t + 1]
            assert r["loss_weights"][t] == float(same)  # never predict across a document boundary
            if t and doc[t] == doc[t - 1]:
                assert r["positions"][t] == r["positions"][t - 1] + 1 and r["segment_ids"][t] == r["segment_ids"][t - 1]
            elif t:
                assert r["positions"][t] == 0 and r["segment_ids"][t] == r["segment_ids"][t - 1] + 1
        assert r["positions"][0] == 0 and r["segment_ids"][0] == 1
        seen_targets.extend(range(start + 1, start + 7))
    assert seen_targets == list(range(1, len(rows) * 6 + 1))  # every target exactly once


def _mesh(n):
    return jax.make_mesh(
        (n, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:n]
    )


class _Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"inputs": np.full((4,), i, np.int32)}


def test_loader_is_deterministic_resumable_and_reshuffles_each_epoch():
    rows = _Rows(40)
    mesh = _mesh(8)
    a = Loader(rows, global_batch=8, mesh=mesh, rules=RULES, seed=3)
    batches = [np.asarray(next(a)["inputs"])[:, 0] for _ in range(12)]
    epoch1, epoch2 = np.concatenate(batches[:5]), np.concatenate(batches[5:10])
    assert sorted(epoch1) == list(range(40)) and sorted(epoch2) == list(range(40))  # no loss, no duplicates
    assert list(epoch1) != list(epoch2)
    b = Loader(rows, global_batch=8, mesh=mesh, rules=RULES, seed=3)
    b.set_state({"step": 7, "global_batch": 8})
    for k in range(7, 12):
        np.testing.assert_array_equal(np.asarray(next(b)["inputs"])[:, 0], batches[k])
    assert b.get_state()["step"] == 12
    c = Loader(rows, global_batch=8, mesh=mesh, rules=RULES, seed=4)
    assert not np.array_equal(np.asarray(next(c)["inputs"])[:, 0], batches[0])


def test_global_batches_do_not_depend_on_the_device_count():
    rows = _Rows(64)
    one = Loader(rows, global_batch=8, mesh=_mesh(1), rules=RULES, seed=0)
    eight = Loader(rows, global_batch=8, mesh=_mesh(8), rules=RULES, seed=0)
    for _ in range(3):
        x8 = next(eight)["inputs"]
        assert len(x8.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(next(one)["inputs"]), np.asarray(x8))
