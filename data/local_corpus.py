"""A TFDS dataset builder that turns a folder or glob of .txt, .jsonl and .parquet files into an
ArrayRecord dataset ({'text': ...} per document, splits train/validation) in a cache directory.

It is a plain ``tfds.core.GeneratorBasedBuilder`` with ``file_format='array_record'``: TFDS writes
ArrayRecord without TensorFlow, and the result is read back through ``tfds.data_source`` exactly as a
named TFDS dataset is. Each distinct set of files (paths, sizes, mtimes) and reading options is its own
builder config, so a changed corpus is rebuilt and an unchanged one is never read twice.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os

import tensorflow_datasets as tfds

from podformer.core.errors import UserError

EXTENSIONS = (".txt", ".jsonl", ".parquet")


def list_files(pattern: str) -> list[str]:
    """The corpus files named by a folder (searched recursively) or a glob, sorted."""
    if os.path.isdir(pattern):
        found = [os.path.join(d, f) for d, _, names in os.walk(pattern) for f in names]
    else:
        found = glob.glob(pattern, recursive=True)
    files = sorted(f for f in found if f.endswith(EXTENSIONS) and os.path.isfile(f))
    if not files:
        raise UserError(f"data.files={pattern!r}: no .txt, .jsonl or .parquet files there")
    return files


def read_documents(path: str, *, text_field: str, doc_split: str):
    """Yield (key, text) for each document of one file; bad input raises a UserError naming the file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading .parquet needs pyarrow (pip install 'podformer[files]')") from None
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
        for i, text in enumerate(table.column(text_field).to_pylist()):
            if text:
                yield f"{i}", str(text)
        return
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it or remove it from data.files") from None
    if path.endswith(".jsonl"):
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{path}:{n}: no field {text_field!r} (found: {keys}); set data.text_field")
            if record[text_field]:
                yield f"{n}", str(record[text_field])
        return
    # .txt: the whole file is one document, or (doc_split='blank_line', BERT's format) each block of
    # lines between blank lines is one.
    docs = [content] if doc_split == "file" else [d for d in content.split("\n\n")]
    for i, doc in enumerate(docs):
        if doc.replace("\0", "").strip():  # NUL bytes are valid UTF-8 but no text (SentencePiece drops them)
            yield f"{i}", doc


@dataclasses.dataclass
class LocalCorpusConfig(tfds.core.BuilderConfig):
    files: tuple[str, ...] = ()
    text_field: str = "text"
    doc_split: str = "file"
    validation_percent: int = 3


def config_for(pattern: str, *, text_field: str, doc_split: str, validation_percent: int) -> LocalCorpusConfig:
    if doc_split not in ("file", "blank_line"):
        raise UserError(f"data.doc_split={doc_split!r}; choose file or blank_line")
    files = tuple(os.path.abspath(f) for f in list_files(pattern))
    h = hashlib.sha256(f"{text_field}|{doc_split}|{validation_percent}".encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns};".encode())
    return LocalCorpusConfig(
        name=h.hexdigest()[:16],
        files=files,
        text_field=text_field,
        doc_split=doc_split,
        validation_percent=validation_percent,
    )


class PodformerLocalCorpus(tfds.core.GeneratorBasedBuilder):
    """Documents of local text files; validation = documents whose (file, key) hash falls in the
    first ``validation_percent`` buckets, the same on every machine."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        # TFDS cannot write an empty split: count first (one extra read of the files, no tokenizing).
        counts = {"train": 0, "validation": 0}
        for _, _, split in self._documents():
            counts[split] += 1
        if not counts["train"]:
            raise UserError(f"data.files: the corpus is empty (no text in {', '.join(self.builder_config.files)})")
        return {split: self._generate_examples(split) for split, n in counts.items() if n}

    def _documents(self):
        c = self.builder_config
        root = os.path.commonpath([os.path.dirname(f) for f in c.files])
        for path in c.files:
            for key, text in read_documents(path, text_field=c.text_field, doc_split=c.doc_split):
                uid = f"{os.path.relpath(path, root)}#{key}"  # a split independent of where the corpus lives
                bucket = int(hashlib.sha1(uid.encode()).hexdigest(), 16) % 100
                yield uid, text, "validation" if bucket < c.validation_percent else "train"

    def _generate_examples(self, split: str):
        for uid, text, s in self._documents():
            if s == split:
                yield uid, {"text": text}


def prepare(config: LocalCorpusConfig, data_dir: str) -> PodformerLocalCorpus:
    """The builder for ``config``, its ArrayRecord files written under ``data_dir`` on first use."""
    builder = PodformerLocalCorpus(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return builder
