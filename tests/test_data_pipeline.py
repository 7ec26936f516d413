"""Sources (local files via ArrayRecord, TFDS via mock data), row datasets per objective, packing over an
epoch, the loader's resume and dynamic masks, the tokenizer CLI and one-line errors."""

import glob
import json
import os
import random

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from podformer.configs import gpt
from podformer.configs.common import RULES
from podformer.core.errors import UserError
from podformer.data import pipeline, sources, special, tokenizer
from podformer.data.loader import Loader

WORDS = "the a cat dog runs jumps over under big small red blue house tree river quickly and but".split()


def _sentence(r):
    return " ".join(r.choice(WORDS) for _ in range(r.randint(4, 14))).capitalize() + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .txt (documents between blank lines) and .jsonl files, and a tokenizer for it."""
    root = tmp_path_factory.mktemp("corpus")
    r = random.Random(0)
    docs = []
    for f in range(4):
        file_docs = [" ".join(_sentence(r) for _ in range(r.randint(3, 12))) for _ in range(15)]
        (root / f"part{f}.txt").write_text("\n\n".join(file_docs))
        docs += file_docs
    with open(root / "more.jsonl", "w") as fh:
        for _ in range(40):
            docs.append(" ".join(_sentence(r) for _ in range(r.randint(2, 8))))
            fh.write(json.dumps({"text": docs[-1], "id": len(docs)}) + "\n")
    cache = tmp_path_factory.mktemp("cache")
    tok = str(cache / "all.model")
    tokenizer.main(["train", f"--source=files:{root}", "--family=all", "--vocab-size=420", f"--output={tok}"])
    return {"root": str(root), "docs": docs, "cache": str(cache), "tokenizer": tok}


def _cfg(corpus, objective, **kw):
    c = gpt.get_config("tiny").data
    c.source, c.files, c.doc_split, c.objective = "files", corpus["root"], "blank_line", objective
    c.cache_dir, c.tokenizer, c.validation_percent = corpus["cache"], corpus["tokenizer"], 10
    for k, v in kw.items():
        c[k] = v
    return c


def _mesh(n=1):
    return jax.make_mesh(
        (n, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:n]
    )


def test_tokenizer_cli_adds_each_family_special_tokens(corpus):
    tok = tokenizer.SentencePieceTokenizer.load(corpus["tokenizer"])
    ids = special.special_ids(tok)
    assert tok.vocab_size == 420 and ids.num_sentinels == 100
    assert tok.piece_to_id("<extra_id_0>") == 419 and tok.piece_to_id("<extra_id_99>") == 320
    assert None not in (ids.cls, ids.sep, ids.mask) and tok.piece_to_id("<mask>") is not None
    assert tok.encode("[MASK]") == [ids.mask]  # never split
    assert (ids.bos, ids.eos, ids.pad) == (1, 2, 0)


def test_local_folder_is_built_into_array_record_and_read_back(corpus):
    src = sources.parse_spec(f"files:{corpus['root']}", doc_split="blank_line", validation_percent=10,
                             cache_dir=corpus["cache"])  # fmt: skip
    train, validation = src.documents("train"), src.documents("validation")
    assert sorted(list(train) + list(validation)) == sorted(corpus["docs"])
    assert 0 < len(validation) < len(train)
    assert glob.glob(os.path.join(corpus["cache"], "tfds", "podformer_local_corpus", "*", "*", "*.array_record*"))


OBJECTIVE_KEYS = {
    "mlm": {"inputs", "targets", "loss_weights", "segment_ids", "positions", "token_types"},
    "mlm_nsp": {"inputs", "targets", "loss_weights", "segment_ids", "positions", "token_types", "next_sentence_labels"},
    "span_corruption": {
        "encoder_inputs",
        "encoder_segment_ids",
        "encoder_positions",
        "decoder_inputs",
        "decoder_targets",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_loss_weights",
    },  # fmt: skip
}
OBJECTIVE_KEYS["roberta"] = OBJECTIVE_KEYS["distill"] = OBJECTIVE_KEYS["mlm"]
OBJECTIVE_KEYS["mlm_sop"] = OBJECTIVE_KEYS["mlm_nsp"]
OBJECTIVE_KEYS["prefix_lm"] = OBJECTIVE_KEYS["bart"] = OBJECTIVE_KEYS["span_corruption"]
OBJECTIVE_KEYS["causal_lm"] = {"inputs", "targets", "loss_weights", "segment_ids", "positions"}


@pytest.mark.parametrize("objective", sorted(OBJECTIVE_KEYS))
def test_every_objective_gives_batches_in_the_key_schema(corpus, objective):
    data = pipeline.build(_cfg(corpus, objective), vocab_size=420, seq_len=64)
    loader = Loader(data.train_rows, global_batch=4, mesh=_mesh(), rules=RULES, seed=0)
    batch = loader.host_batch(0)
    assert set(batch) == OBJECTIVE_KEYS[objective]
    for k, v in batch.items():
        assert v.shape[0] == 4 and (v.ndim == 1 if k == "next_sentence_labels" else v.shape[1] <= 64)
    seg = batch.get("segment_ids", batch.get("decoder_segment_ids"))
    weights = batch.get("loss_weights", batch.get("decoder_loss_weights"))
    assert (weights[seg == 0] == 0).all()  # padding is never a target


def _segments_are_runs_with_restarting_positions(seg, pos):
    for s, p in zip(seg, pos, strict=True):
        assert s[0] in (0, 1) and (np.diff(s[s > 0]) >= 0).all()
        for k in np.unique(s[s > 0]):
            np.testing.assert_array_equal(p[s == k], np.arange((s == k).sum()))
            assert np.all(np.diff(np.flatnonzero(s == k)) == 1)  # one contiguous run per segment


def test_packing_covers_every_token_once_per_epoch(corpus):
    tok = tokenizer.SentencePieceTokenizer.load(corpus["tokenizer"])
    ids = special.special_ids(tok)
    # RoBERTa FULL-SENTENCES: rows minus <s>, </s> and document separators are the store, in order.
    data = pipeline.build(_cfg(corpus, "roberta"), vocab_size=420, seq_len=64)
    rows = data.train_rows
    store = rows.store
    flat = np.concatenate([rows[i]["tokens"][1:-1] for i in range(len(rows))])
    np.testing.assert_array_equal(flat[flat != ids.eos], np.asarray(store.tokens))
    inner = ~np.isin(store.doc_starts[1:-1], rows.bounds)  # document boundaries inside a row
    assert (flat == ids.eos).sum() == inner.sum() > 0  # one separator for each
    assert max(len(rows[i]["tokens"]) for i in range(len(rows))) <= 64
    # BART: decoder targets per segment are <s> block </s>; blocks tile the store; sources stay apart.
    data = pipeline.build(_cfg(corpus, "bart"), vocab_size=420, seq_len=64)
    rows, seen = data.train_rows, []
    for i in range(len(rows)):
        row = rows.transform(rows[i], np.random.default_rng(i))
        seg, tgt = row["decoder_segment_ids"], row["decoder_targets"]
        _segments_are_runs_with_restarting_positions(seg[None], row["decoder_positions"][None])
        _segments_are_runs_with_restarting_positions(row["encoder_segment_ids"][None], row["encoder_positions"][None])
        assert set(np.unique(row["encoder_segment_ids"])) - {0} == set(np.unique(seg)) - {0}
        for k in np.unique(seg[seg > 0]):
            block = tgt[seg == k]
            assert block[0] == ids.bos and block[-1] == ids.eos
            assert row["decoder_inputs"][seg == k][0] == ids.eos  # shifted within the segment
            np.testing.assert_array_equal(row["decoder_inputs"][seg == k][1:], block[:-1])
            seen.append(block[1:-1])
    np.testing.assert_array_equal(np.concatenate(seen), np.asarray(rows.store.tokens))
    # Prefix LM: inputs + targets of each segment give back the store's tokens.
    data = pipeline.build(_cfg(corpus, "prefix_lm"), vocab_size=420, seq_len=64)
    rows, seen = data.train_rows, []
    for i in range(len(rows)):
        row = rows.transform(rows[i], np.random.default_rng(i))
        es, ds = row["encoder_segment_ids"], row["decoder_segment_ids"]
        _segments_are_runs_with_restarting_positions(ds[None], row["decoder_positions"][None])
        for k in np.unique(ds[ds > 0]):
            seen += [row["encoder_inputs"][es == k][:-1], row["decoder_targets"][ds == k][:-1]]
    np.testing.assert_array_equal(np.concatenate(seen), np.asarray(rows.store.tokens))


def test_nsp_rows_decode_to_the_corpus_text(corpus):
    data = pipeline.build(_cfg(corpus, "mlm_nsp", mlm_probability=0.0), vocab_size=420, seq_len=64)
    rows, tok = data.train_rows, data.tokenizer
    labels = []
    for i in range(min(len(rows), 60)):
        row = rows.transform(rows[i], np.random.default_rng(i))
        types, seg = row["token_types"], row["segment_ids"]
        inputs = np.where(row["loss_weights"] > 0, row["targets"], row["inputs"])  # undo the masking
        real = inputs[seg > 0]
        ids = special.special_ids(tok)
        a = tok.decode(real[1 : (types[seg > 0] == 0).sum() - 1])
        assert a.strip() and any(a.strip() in d for d in data_docs(corpus))
        labels.append(int(row["next_sentence_labels"]))
        assert real[0] == ids.cls and real[-1] == ids.sep
    assert 0 < np.mean(labels) < 1


def data_docs(corpus):
    return [" ".join(d.split()) for d in corpus["docs"]] + corpus["docs"]


def test_loader_resumes_mid_epoch_with_masks_new_each_epoch(corpus):
    data = pipeline.build(_cfg(corpus, "mlm"), vocab_size=420, seq_len=64)
    rows = data.train_rows
    n = len(rows) // 4  # steps per epoch
    a = Loader(rows, global_batch=4, mesh=_mesh(), rules=RULES, seed=5)
    first = [{k: np.asarray(v) for k, v in next(a).items()} for _ in range(n + 3)]
    b = Loader(rows, global_batch=4, mesh=_mesh(), rules=RULES, seed=5)
    b.set_state({"step": n - 2, "global_batch": 4})
    for k in range(n - 2, n + 3):
        got = next(b)
        for key in first[k]:
            np.testing.assert_array_equal(np.asarray(got[key]), first[k][key])
    # The same row in two epochs: same text, different masks (dynamic); static masks repeat.
    shuffled = a.row_dataset._parent  # before the objective's random_map
    where = {int(shuffled[j]["index"]): j for j in range(n * 4)}
    j2 = next(j for j in range(n * 4, 2 * n * 4) if int(shuffled[j]["index"]) == int(shuffled[0]["index"]))
    r1, r2 = a.row_dataset[where[int(shuffled[0]["index"])]], a.row_dataset[j2]
    assert not np.array_equal(r1["loss_weights"], r2["loss_weights"])
    static = pipeline.build(_cfg(corpus, "mlm", dynamic_masking=False), vocab_size=420, seq_len=64).train_rows
    s = Loader(static, global_batch=4, mesh=_mesh(), rules=RULES, seed=5).row_dataset
    np.testing.assert_array_equal(s[where[int(shuffled[0]["index"])]]["inputs"], s[j2]["inputs"])


def test_worker_processes_give_the_same_batches(corpus):
    rows = pipeline.build(_cfg(corpus, "span_corruption"), vocab_size=420, seq_len=64).train_rows
    inline = Loader(rows, global_batch=4, mesh=_mesh(), rules=RULES, seed=1)
    workers = Loader(rows, global_batch=4, mesh=_mesh(), rules=RULES, seed=1, num_workers=1)
    try:
        for _ in range(3):
            x, y = next(inline), next(workers)
            for k in x:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
    finally:
        workers.close()


def test_mixture_draws_in_proportion(corpus):
    cfg = _cfg(corpus, "span_corruption", source="mixture",
               mixture=f"files:{corpus['root']}/*.txt=0.75, files:{corpus['root']}/*.jsonl=0.25")  # fmt: skip
    data = pipeline.build(cfg, vocab_size=420, seq_len=64)
    picks = [data.train_rows[i]["component"] for i in range(200)]
    assert abs(np.mean(np.asarray(picks) == 0) - 0.75) < 0.02
    assert "x0.75" in data.description


def test_named_tfds_dataset_end_to_end_through_mock_data(corpus):
    # mock_data patches this process only: the store is built here, not by worker processes.
    cfg = _cfg(corpus, "bart", source="tfds", tfds_name="wikipedia/20230601.en", validation_split="train[:10%]",
               build_workers=1)  # fmt: skip
    with tfds.testing.mock_data(num_examples=60):
        data = pipeline.build(cfg, vocab_size=420, seq_len=64)
        batch = Loader(data.train_rows, global_batch=4, mesh=_mesh(), rules=RULES, seed=0).host_batch(0)
        with pytest.raises(UserError, match="wikipedia.*no feature 'body'") as e:
            pipeline.build(_cfg(corpus, "mlm", source="tfds", tfds_name="wikipedia/20230601.en", text_field="body",
                                build_workers=1),
                           vocab_size=420, seq_len=64)  # fmt: skip
        assert "\n" not in str(e.value)
    assert batch["encoder_inputs"].shape == (4, 64) and "wikipedia" in data.description


def _one_line_error(match, fn):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_input_gives_one_line_errors_naming_the_file_or_dataset(corpus, tmp_path):
    cache = str(tmp_path / "cache")
    build = lambda **kw: pipeline.build(_cfg(corpus, "mlm", cache_dir=cache, **kw), vocab_size=420, seq_len=64)  # noqa: E731
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n\n")
    _one_line_error("empty.*corpus is empty|corpus is empty", lambda: build(files=str(tmp_path / "empty")))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "b.txt").write_bytes(b"ok text\n\xff\xfe\x00 binary")
    _one_line_error(r"b\.txt: not UTF-8", lambda: build(files=str(tmp_path / "bin")))
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "c.jsonl").write_text('{"body": "hello"}\n')
    _one_line_error(r"c\.jsonl:1: no field 'text'", lambda: build(files=str(tmp_path / "js")))
    _one_line_error("no_such_dataset_xyz.*not found", lambda: build(source="tfds", tfds_name="no_such_dataset_xyz"))
    # A real ArrayRecord dataset (the one the folder was built into), read by name, lacks a 'test' split.
    spec = sources.parse_spec("files:" + corpus["root"], doc_split="blank_line", validation_percent=10)
    name = f"podformer_local_corpus/{spec._config().name}"
    _one_line_error(
        f"{name}.*no split 'test'",
        lambda: build(
            source="tfds", tfds_name=name, tfds_data_dir=os.path.join(corpus["cache"], "tfds"), validation_split="test"
        ),  # fmt: skip
    )
