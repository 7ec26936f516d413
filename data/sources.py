"""Document sources: the embedded corpus, named TFDS datasets and local files, as random-access
sequences of texts per split.

A source spec is a string: ``embedded``, ``tfds:NAME[/CONFIG][:VERSION]`` (e.g. ``tfds:c4/en:3.1.0``,
``tfds:wikipedia/20230601.en``) or ``files:FOLDER_OR_GLOB``. TFDS datasets are read through
``tfds.data_source`` (ArrayRecord random access, no TensorFlow); local files are first built into an
ArrayRecord TFDS dataset by data/local_corpus.py and then read the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os

from podformer.core.errors import UserError
from podformer.data import corpus


def cache_dir(configured: str = "") -> str:
    """Where tokenizers, token caches and prepared corpora are kept: data.cache_dir, else $PODFORMER_CACHE,
    else ~/.cache/podformer."""
    return (
        configured or os.environ.get("PODFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "podformer")
    )


@contextlib.contextmanager
def quiet_absl():
    """TFDS logs a warning per custom config and per missing metadata folder; keep the run's log clean."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


class Documents:
    """A random-access sequence of texts over a TFDS data source (decodes bytes; supports slices)."""

    def __init__(self, source, text_field: str, name: str):
        self.source, self.text_field, self.name = source, text_field, name

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self):
        for i in range(0, len(self), 256):
            yield from self[i : i + 256]

    def _text(self, record, index: int) -> str:
        if self.text_field not in record:
            raise UserError(
                f"{self.name}: no feature {self.text_field!r} (features: {', '.join(record)}); set data.text_field"
            )
        value = record[self.text_field]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{self.name}: example {index} is not UTF-8 text") from None
        return str(value)

    def __getitem__(self, index):
        if isinstance(index, slice):
            indices = list(range(*index.indices(len(self))))
            try:  # one batched read where the source has it (ArrayRecord)
                records = self.source.__getitems__(indices)
            except (AttributeError, TypeError):  # tfds.testing.mock_data's sources lack it
                records = [self.source[i] for i in indices]
            return [self._text(r, i) for r, i in zip(records, indices, strict=True)]
        return self._text(self.source[index], index)


class SplitDocuments:
    """``source.documents(split)``, opened on first use and reopened after pickling (the store builder's
    worker processes receive the source and the split, not an open ArrayRecord reader)."""

    def __init__(self, source, split: str):
        self.source, self.split, self._docs = source, split, None

    def __getstate__(self):
        return {"source": self.source, "split": self.split, "_docs": None}

    @property
    def docs(self):
        if self._docs is None:
            self._docs = self.source.documents(self.split)
        return self._docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index):
        return self.docs[index]


@dataclasses.dataclass(frozen=True)
class Embedded:
    validation_percent: int = 3
    name: str = corpus.NAME

    def documents(self, split: str) -> list[str]:
        return corpus.documents(split, self.validation_percent)

    def fingerprint(self, split: str) -> str:
        return f"{corpus.fingerprint(self.validation_percent)}-{split}"

    def corpus_fingerprint(self) -> str:
        return corpus.fingerprint(self.validation_percent)


def _import_text_builders() -> None:
    # TFDS imports its dataset modules lazily; c4, wikipedia, ... register when `text` is imported.
    import tensorflow_datasets.text  # noqa: F401


@dataclasses.dataclass(frozen=True)
class Tfds:
    dataset: str  # NAME[/CONFIG][:VERSION]
    data_dir: str = ""
    text_field: str = "text"

    @property
    def name(self) -> str:
        return f"TFDS dataset {self.dataset!r}" + (f" in {self.data_dir}" if self.data_dir else "")

    def _source(self, split: str):
        import tensorflow_datasets as tfds

        _import_text_builders()
        try:
            with quiet_absl():
                return tfds.data_source(self.dataset, split=split, data_dir=self.data_dir or None, download=False)
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(f"{self.name} not found: check the name, or set data.tfds_data_dir") from None
        except (ValueError, KeyError, AssertionError, FileNotFoundError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "has not been generated" in msg or "not found" in msg.lower():
                where = self.data_dir or "the default TFDS data_dir"
                raise UserError(
                    f"{self.name} is not prepared in {where}: build it with `tfds build` or set data.tfds_data_dir"
                ) from None
            if "split" in msg.lower():
                raise UserError(f"{self.name}: no split {split!r} ({msg[:200]})") from None
            raise UserError(f"{self.name} cannot be read: {msg[:300]}") from None

    def documents(self, split: str) -> Documents:
        source = self._source(split)
        if len(source) == 0:
            raise UserError(f"{self.name}: split {split!r} is empty")
        return Documents(source, self.text_field, self.name)

    def fingerprint(self, split: str) -> str:
        docs = self.documents(split)
        return hashlib.sha256(f"{self.dataset}|{split}|{len(docs)}|{self.text_field}".encode()).hexdigest()[:16]

    def corpus_fingerprint(self) -> str:
        return hashlib.sha256(f"{self.dataset}|{self.text_field}".encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Files:
    pattern: str
    text_field: str = "text"
    doc_split: str = "file"
    validation_percent: int = 3
    cache_dir: str = ""

    @property
    def name(self) -> str:
        return f"data.files={self.pattern!r}"

    def _config(self):
        from podformer.data import local_corpus  # here, not above: it imports TensorFlow Datasets (seconds)

        return local_corpus.config_for(
            self.pattern,
            text_field=self.text_field,
            doc_split=self.doc_split,
            validation_percent=self.validation_percent,
        )

    def prepare(self):
        """Build the ArrayRecord dataset (once); returns the builder."""
        from podformer.data import local_corpus  # here, not above: it imports TensorFlow Datasets (seconds)

        with quiet_absl():
            builder = local_corpus.prepare(self._config(), os.path.join(cache_dir(self.cache_dir), "tfds"))
        if builder.info.splits["train"].num_examples == 0:
            raise UserError(f"{self.name}: the corpus is empty (no file has any text)")
        return builder

    def documents(self, split: str) -> Documents:
        builder = self.prepare()
        if split not in builder.info.splits or builder.info.splits[split].num_examples == 0:
            raise UserError(f"{self.name}: the {split} split is empty; add documents or change data.validation_percent")
        return Documents(builder.as_data_source(split=split), "text", f"{self.name} ({builder.data_dir})")

    def fingerprint(self, split: str) -> str:
        return f"{self._config().name}-{split}"

    def corpus_fingerprint(self) -> str:
        return self._config().name


def parse_spec(
    spec: str,
    *,
    data_dir: str = "",
    text_field: str = "text",
    doc_split: str = "file",
    validation_percent: int = 3,
    cache_dir: str = "",
):
    """A source from its spec string (see the module docstring)."""
    kind, _, rest = spec.strip().partition(":")
    if kind == "embedded" and not rest:
        return Embedded(validation_percent)
    if kind == "tfds" and rest:
        return Tfds(rest, data_dir, text_field)
    if kind == "files" and rest:
        return Files(rest, text_field, doc_split, validation_percent, cache_dir)
    raise UserError(f"data source {spec!r}: use embedded, tfds:NAME[:VERSION] or files:FOLDER_OR_GLOB")


def parse_mixture(spec: str, **kwargs) -> list[tuple[object, float]]:
    """``'SPEC=WEIGHT, SPEC=WEIGHT'`` -> [(source, weight)], weights normalised to sum 1."""
    parts = []
    for item in (p.strip() for p in spec.split(",") if p.strip()):
        src, sep, weight = item.rpartition("=")
        try:
            w = float(weight) if sep else float("nan")
        except ValueError:
            w = float("nan")
        if not sep or not w > 0:
            raise UserError(f"data.mixture item {item!r}: write SOURCE=WEIGHT with a positive weight")
        parts.append((parse_spec(src, **kwargs), w))
    if not parts:
        raise UserError("data.source=mixture needs data.mixture='SOURCE=WEIGHT, SOURCE=WEIGHT'")
    total = sum(w for _, w in parts)
    return [(s, w / total) for s, w in parts]


# The sources a store-building worker may reopen from their config (data/shards.py's portable jobs).
PORTABLE = {cls.__name__: cls for cls in (Embedded, Tfds, Files)}
