"""Parallel, resumable store builds: a split's documents in fixed shards, tokenized by worker processes.

The shards are contiguous document ranges fixed by the number of documents alone (``plan``), so the
store -- the shards concatenated in order -- is the same bit for bit whatever the number of workers or
hosts. Each shard is written whole (temporary file, then rename) into ``<store>.parts/``, so a killed
build resumes from the shards it completed; a host starts with its own shards (``k % process_count``)
and then builds whatever is still missing (on a shared cache the other hosts' shards appear and are
skipped; on a local disk each host ends up with the whole store). The workers are ``python -m`` child
processes, not ``multiprocessing``: spawning re-imports the entry script (JAX and all) in every worker,
and forking a process that runs JAX's threads can deadlock.

    python -m podformer.data.shards PARTS_DIR   # a worker: reads shard numbers on stdin, one a line
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from podformer.core.errors import UserError
from podformer.data import hf_tokenizer, sources, tokenizer
from podformer.data.sentences import split_sentences

FORMAT = "shards-v1"
TARGET_SHARDS = 256  # enough to keep every core of a host (and every host of a slice) busy
MAX_DOCS_PER_SHARD = 4096  # bounds a shard's memory (and the work a kill loses) on huge corpora
MIN_PARALLEL_S = 4.0  # work below which starting worker processes (about a second each) does not pay
PIECE_CHARS = 1 << 16  # long documents are encoded in newline-cut pieces of about this size


def plan(num_docs: int) -> list[tuple[int, int]]:
    """Document ranges [lo, hi) of the shards; a function of the number of documents only."""
    per = min(MAX_DOCS_PER_SHARD, max(1, math.ceil(num_docs / TARGET_SHARDS)))
    return [(lo, min(lo + per, num_docs)) for lo in range(0, num_docs, per)]


def newline_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut after a newline about every ``size`` characters (pieces concatenate to ``text``)."""
    out, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        if cut < 0:
            break
        out.append(text[start : cut + 1])
        start = cut + 1
    out.append(text[start:])
    return out


@dataclasses.dataclass
class Job:
    """What a worker needs (a JSON description in a private temporary file, ``portable``): the documents,
    the tokenizer, the kind."""

    documents: Sequence[str]
    tokenizer: object
    kind: str  # "tokens" (documents with BOS/EOS) | "sentences" (sentence lengths and counts per document)
    dtype: str
    bos_id: int | None = None
    eos_id: int | None = None


def portable(job: Job) -> dict | None:
    """``job`` as JSON for the worker processes, or None when it cannot be described (a bare encode
    function, a document sequence that is neither a list of texts nor a source's split): then the build
    runs in this process. Data, never code or pickles: the documents as their source's config and split
    (data/sources.py's dataclasses; each worker opens them) or as the texts, the tokenizer as its model."""
    spec = getattr(job.tokenizer, "worker_spec", None)
    if spec is None:
        return None
    docs = job.documents
    if isinstance(docs, sources.SplitDocuments) and type(docs.source).__name__ in sources.PORTABLE:
        documents = {"source": type(docs.source).__name__, "config": dataclasses.asdict(docs.source)}
        documents["split"] = docs.split
    elif isinstance(docs, list | tuple) and all(isinstance(t, str) for t in docs):
        documents = {"texts": list(docs)}
    else:
        return None
    fields = {k: getattr(job, k) for k in ("kind", "dtype", "bos_id", "eos_id")}
    return {"documents": documents, "tokenizer": spec(), **fields}


def from_portable(d: dict) -> Job:
    """The Job ``portable`` described."""
    docs = d["documents"]
    if "texts" in docs:
        documents = docs["texts"]
    else:
        source = sources.PORTABLE[docs["source"]](**docs["config"])
        documents = sources.SplitDocuments(source, docs["split"])
    t = d["tokenizer"]
    if t["type"] == "sentencepiece":
        tok = tokenizer.SentencePieceTokenizer(bytes.fromhex(t["model"]), t["path"])
    else:
        tok = hf_tokenizer.HFTokenizer(t["json"], t["special"], t["path"])
    return Job(documents, tok, d["kind"], d["dtype"], d["bos_id"], d["eos_id"])


def _encode(tok, texts: list[str], threads: int) -> list[list[int]]:
    # A tokenizer whose "\n" is an unsplittable piece (podformer's SentencePiece models) encodes a text
    # as the concatenation of its newline-cut pieces: long documents become many short encodes, which
    # is several times faster than one and parallel within a document too.
    if not getattr(tok, "newline_is_piece", False):
        return tok.encode_batch(texts, num_threads=threads)
    pieces, owner = [], []
    for i, t in enumerate(texts):
        for p in newline_pieces(t):
            pieces.append(p)
            owner.append(i)
    out: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(owner, tok.encode_batch(pieces, num_threads=threads), strict=True):
        out[i].extend(ids)
    return out


def encode_shard(job: Job, lo: int, hi: int, threads: int = 1) -> tuple[dict[str, np.ndarray], int]:
    """The arrays of documents [lo, hi) and the bytes of text they hold."""
    texts = list(job.documents[lo:hi])
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    dtype = np.dtype(job.dtype)
    if job.kind == "tokens":
        bos = [job.bos_id] if job.bos_id is not None else []
        eos = [job.eos_id] if job.eos_id is not None else []
        docs = (
            [bos + ids + eos for ids in _encode(job.tokenizer, texts, threads)]
            if (bos or eos)
            else (_encode(job.tokenizer, texts, threads))
        )
        lengths = np.array([len(d) for d in docs], np.int64)
        tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype, int(lengths.sum()))
        return {"tokens": tokens, "lengths": lengths}, nbytes
    sents = [split_sentences(t) for t in texts]
    flat = [s for d in sents for s in d]
    ids = job.tokenizer.encode_batch(flat, num_threads=threads) if flat else []
    sent_lengths, counts, k = [], [], 0
    for d in sents:
        n = [len(x) for x in ids[k : k + len(d)] if len(x)]
        k += len(d)
        if n:
            sent_lengths.extend(n)
            counts.append(len(n))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype, sum(sent_lengths))
    arrays = {"tokens": tokens, "sent_lengths": np.array(sent_lengths, np.int64), "counts": np.array(counts, np.int64)}
    return arrays, nbytes


def _shard_path(parts: str, k: int) -> str:
    return os.path.join(parts, f"shard-{k:06d}.npz")


def _write_shard(parts: str, k: int, arrays: dict[str, np.ndarray], nbytes: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=parts, prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, nbytes=np.int64(nbytes), **arrays)
    os.replace(tmp, _shard_path(parts, k))  # whole or absent: a killed build never sees half a shard


def load_shard(parts: str, k: int, *names: str) -> dict[str, np.ndarray]:
    """Arrays of shard k (``names``, or all); reading one member of the .npz leaves the others on disk."""
    with np.load(_shard_path(parts, k)) as z:
        return {name: z[name] for name in (names or z.files)}


class Progress:
    """One line, on process 0 only: shards, MB of raw text, MB/s and the time left."""

    def __init__(self, name: str, total: int, enabled: bool, stream=None):
        self.name, self.total, self.enabled = name, total, enabled
        self.stream = stream or sys.stderr
        self.done = self.nbytes = 0
        self.start = self.last = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, nbytes: int, shards: int = 1) -> None:
        self.done += shards
        self.nbytes += nbytes
        now = time.perf_counter()
        if self.enabled and (self.done == self.total or now - self.last >= (0.5 if self.tty else 10)):
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line(now) + ("" if self.tty else "\n"))
            if self.tty and self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        dt = max(now - self.start, 1e-9)
        rate = self.nbytes / dt / 1e6
        left = dt / self.done * (self.total - self.done) if self.done else float("nan")
        width = 24
        bar = "#" * int(width * self.done / max(self.total, 1))
        return (
            f"tokenizing {self.name}: [{bar:<{width}}] {self.done}/{self.total} shards, "
            f"{self.nbytes / 1e6:,.1f} MB, {rate:.1f} MB/s, {left:.0f} s left"
        )


def _order(n: int, process_index: int, process_count: int) -> list[int]:
    own = [k for k in range(n) if k % process_count == process_index]
    return own + [k for k in range(n) if k % process_count != process_index]


def build_parts(
    parts: str,
    job: Job,
    *,
    workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    own_only: bool = False,
    name: str = "",
    progress: bool = True,
    min_parallel_s: float = MIN_PARALLEL_S,
) -> list[tuple[int, int]]:
    """Every shard of ``job`` in ``parts`` (those already there are kept); returns the plan. The first
    shard is built here and timed: when the rest would take under ``min_parallel_s`` in this process,
    they are built here too (starting the workers costs seconds: small corpora and tests)."""
    os.makedirs(parts, exist_ok=True)
    shards = plan(len(job.documents))
    manifest = {"format": FORMAT, "num_docs": len(job.documents), "shards": shards, "kind": job.kind}
    mpath = os.path.join(parts, "manifest.json")
    if os.path.exists(mpath):
        with open(mpath) as f:
            if json.load(f) != json.loads(json.dumps(manifest)):  # another layout: start over
                for f_ in os.listdir(parts):
                    if f_.startswith("shard-"):
                        os.remove(os.path.join(parts, f_))
    fd, tmp = tempfile.mkstemp(dir=parts, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, mpath)
    todo = _order(len(shards), process_index, process_count)
    if own_only:
        todo = [k for k in todo if k % process_count == process_index]
    todo = [k for k in todo if not os.path.exists(_shard_path(parts, k))]
    quiet = os.environ.get("PODFORMER_NO_PROGRESS") == "1"
    bar = Progress(name, len(todo), enabled=progress and process_index == 0 and not quiet)
    workers = workers or os.cpu_count() or 1
    described = portable(job) if workers > 1 and len(todo) > 1 else None
    if described is None:  # one worker, or a job the workers cannot be told (a bare function: tests)
        workers = 1
    if workers > 1 and min_parallel_s > 0 and todo:
        t = time.perf_counter()
        _build_here(parts, job, shards, todo[:1], bar)
        todo = todo[1:]
        if (time.perf_counter() - t) * len(todo) < min_parallel_s:
            workers = 1
    if workers == 1 or len(todo) <= 1:
        _build_here(parts, job, shards, todo, bar)
        return shards
    _run_workers(parts, described, todo, min(workers, len(todo)), bar)
    return shards


def _build_here(parts: str, job: Job, shards: list[tuple[int, int]], todo: list[int], bar: Progress) -> None:
    for k in todo:
        if os.path.exists(_shard_path(parts, k)):  # another host built it meanwhile
            bar.update(0)
            continue
        # One process: SentencePiece's own threads use every core.
        arrays, nbytes = encode_shard(job, *shards[k], threads=os.cpu_count() or 1)
        _write_shard(parts, k, arrays, nbytes)
        bar.update(nbytes)


def _run_workers(parts: str, described: dict, todo: list[int], workers: int, bar: Progress) -> None:
    # The job goes to the workers as JSON (``portable``: data, no code) in this user's private temporary
    # file (mode 0600), never into the cache, which other hosts and users may share.
    fd, jpath = tempfile.mkstemp(prefix="podformer-store-job-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(described, f)
    # One thread a worker (the workers are the parallelism): Hugging Face tokenizers' pool too.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "RAYON_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "podformer.data.shards", parts, jpath],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        for _ in range(workers)
    ]
    sel = selectors.DefaultSelector()
    queue = list(todo)
    try:
        for p in procs:  # dynamic scheduling: a worker gets its next shard when it reports the last one
            sel.register(p.stdout, selectors.EVENT_READ, p)
            p.stdin.write(f"{queue.pop(0)}\n" if queue else "\n")
            p.stdin.flush()
        running = len(procs)
        while running:
            for key, _ in sel.select():
                p = key.data
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"a store-building worker died (exit {p.wait()}); rerun to resume")
                if line.startswith("error "):
                    raise UserError(line[6:].strip())
                if line.strip() == "bye":
                    sel.unregister(p.stdout)
                    running -= 1
                    continue
                bar.update(int(line.split()[1]))
                p.stdin.write(f"{queue.pop(0)}\n" if queue else "\n")
                p.stdin.flush()
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a store-building worker failed (exit {p.returncode}); rerun to resume")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        os.remove(jpath)


def _worker(parts: str, jpath: str) -> None:
    # The protocol gets its own copy of stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        with open(jpath, encoding="utf-8") as f:
            job = from_portable(json.load(f))
        shards = plan(len(job.documents))
        for line in sys.stdin:
            if not line.strip():
                break
            k = int(line)
            nbytes = 0
            if not os.path.exists(_shard_path(parts, k)):
                arrays, nbytes = encode_shard(job, *shards[k], threads=1)
                _write_shard(parts, k, arrays, nbytes)
            print(f"{k} {nbytes}", file=proto, flush=True)
    except UserError as e:  # bad input: the parent reports it as its own one-line error
        print(f"error {e}".replace("\n", " "), file=proto, flush=True)
        sys.exit(2)
    print("bye", file=proto, flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
