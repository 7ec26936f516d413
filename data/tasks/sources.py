"""Fine-tuning examples from TFDS datasets and local JSONL/CSV files, in one canonical schema per task type.

Canonical fields (what ``read_examples`` returns, and what a local file holds, one example a line/row):

    classification  text, text_pair (optional), label (a class name; returned as its index in label_names)
    regression      text, text_pair (optional), label (a number)
    qa              id (optional), question, context, answers {"text": [...], "answer_start": [...]}
                    (or a list of {"text", "answer_start"}); no answers = unanswerable (SQuAD v2)
    tagging         tokens (list of words), tags (list of tag names, one per token)
    text2text       inputs, targets
    sft             prompt, completion

Every file may also carry ``id`` / ``idx``. In CSV files (a header row names the fields) ``tokens`` and
``tags`` are space-separated and ``answers`` is JSON. A file that omits the target field (label, answers,
tags, targets, completion) on every line is unlabelled (target None: predict mode); so are GLUE's test
splits. ``text_fields`` maps other names onto these: a sequence in the order above (``sentence1,sentence2``
for text, text_pair) or a dict {canonical: name}. A source is ``tfds:NAME[/CONFIG][:VERSION]`` (read
through ``tfds.data_source``: ArrayRecord, no TensorFlow), a .jsonl/.csv file (the split is ignored) or a
folder holding ``<split>.jsonl`` or ``<split>.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from podformer.core.errors import UserError
from podformer.data import sources as data_sources

TASK_TYPES = ("classification", "regression", "qa", "tagging", "text2text", "sft")
# Per task type: the input fields (in text_fields order), the target field, the optional inputs.
FIELDS = {
    "classification": (("text", "text_pair"), "label"),
    "regression": (("text", "text_pair"), "label"),
    "qa": (("question", "context"), "answers"),
    "tagging": (("tokens",), "tags"),
    "text2text": (("inputs",), "targets"),
    "sft": (("prompt",), "completion"),
}
OPTIONAL = ("text_pair", "id", "idx")
_EXTRA = ("id", "idx")  # kept or ignored in any file, never an unknown-field error

# TFDS features per dataset; datasets not listed are read through their features named as the canonical
# fields (or through text_fields).
GLUE = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
    "ax": ("premise", "hypothesis"),
}
TFDS_FIELDS = {
    **{f"glue/{k}": dict(zip(("text", "text_pair"), v, strict=False)) for k, v in GLUE.items()},
    "squad": {"id": "id", "question": "question", "context": "context", "answers": "answers"},
    "conll2003": {"tokens": "tokens", "tags": "ner"},
    "conll2002": {"tokens": "tokens", "tags": "ner"},
    "wikiann": {"tokens": "tokens", "tags": "tags"},
    "imdb_reviews": {"text": "text"},
    "ag_news_subset": {"text": "title", "text_pair": "description"},
    "cnn_dailymail": {"inputs": "article", "targets": "highlights"},
    "xsum": {"inputs": "document", "targets": "summary"},
    "gigaword": {"inputs": "document", "targets": "summary"},
    "samsum": {"inputs": "dialogue", "targets": "summary"},
    "multi_news": {"inputs": "document", "targets": "summary"},
    "billsum": {"inputs": "text", "targets": "summary"},
    "scientific_papers": {"inputs": "article", "targets": "abstract"},
}
_MAX_NAMES = 12  # label sets listed in an error message


def _check_type(task_type: str) -> None:
    if task_type not in FIELDS:
        raise UserError(f"task type {task_type!r}: choose one of {', '.join(TASK_TYPES)}")


def field_map(task_type: str, text_fields=None, defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """{canonical field: source field} for a task type, from text_fields (sequence, 'a,b' string or dict)."""
    _check_type(task_type)
    inputs, target = FIELDS[task_type]
    fmap = {k: k for k in (*inputs, target)} | dict(defaults or {})
    if isinstance(text_fields, str):
        text_fields = [f.strip() for f in text_fields.split(",") if f.strip()]
    if isinstance(text_fields, Mapping):
        unknown = set(text_fields) - {*fmap, *_EXTRA}
        if unknown:
            raise UserError(f"text_fields: {', '.join(sorted(unknown))} is not a {task_type} field ({', '.join(fmap)})")
        fmap |= dict(text_fields)
    elif text_fields:
        names = (*inputs, target)
        if len(text_fields) > len(names):
            raise UserError(f"text_fields {list(text_fields)}: {task_type} takes at most {', '.join(names)}")
        fmap |= dict(zip(names, text_fields, strict=False))
        if len(text_fields) == 1:
            fmap.pop("text_pair", None)  # one text field given: a single-text task
    return fmap


def _split_source(source: str) -> tuple[str, str]:
    kind, sep, rest = source.partition(":")
    if sep and kind == "tfds":
        if not rest:
            raise UserError(f"task source {source!r}: write tfds:NAME[/CONFIG][:VERSION]")
        return "tfds", rest
    return "local", rest if sep and kind == "files" else source


def read_examples(
    task_type: str, source: str, split: str, *, data_dir=None, text_fields=None, labels: Sequence[str] | None = None
) -> list[dict]:
    """The examples of ``split`` of ``source`` in the canonical schema of ``task_type`` (module docstring).
    Classification labels come back as indices into ``labels`` (default: ``label_names(...)``)."""
    _check_type(task_type)
    kind, where = _split_source(source)
    if kind == "tfds":
        return _read_tfds(task_type, where, split, data_dir or "", text_fields)
    path = _local_file(where, split)
    rows = _read_local(task_type, path, field_map(task_type, text_fields))
    if task_type in ("classification", "tagging"):
        names = list(labels) if labels is not None else label_names(task_type, source, text_fields=text_fields)
        _check_labels(task_type, rows, names, path, given=labels is not None)
    return [ex for _, ex in rows]


def label_names(
    task_type: str, source: str, *, data_dir=None, examples: Sequence[dict] | None = None, text_fields=None
) -> list[str] | None:
    """Class names (classification) or tag names (tagging); None for other task types. TFDS: the
    ClassLabel names. Local files: the distinct labels of the train file (a folder) or of the file, sorted
    (numerically where all are integers; tagging puts "O" first). ``examples``: derive them from these
    canonical examples (string labels/tags) instead."""
    _check_type(task_type)
    if task_type not in ("classification", "tagging"):
        return None
    key = "label" if task_type == "classification" else "tags"
    if examples is not None:
        values = [ex[key] for ex in examples if ex.get(key) is not None]
        return _sorted_names([str(v) for t in values for v in (t if task_type == "tagging" else [t])], task_type)
    kind, where = _split_source(source)
    if kind == "tfds":
        features = _tfds_features(where, data_dir or "")
        fmap = field_map(task_type, text_fields, TFDS_FIELDS.get(_base_name(where)))
        return _class_names(features, fmap[key], where, task_type)
    path = _label_file(where)
    rows = _read_local(task_type, path, field_map(task_type, text_fields))
    values = [ex[key] for _, ex in rows if ex[key] is not None]
    if not values:
        raise UserError(f"{path}: unlabelled (no {key!r} field), so it gives no label set; label it or set the labels")
    return _sorted_names([str(v) for t in values for v in (t if task_type == "tagging" else [t])], task_type)


def _sorted_names(values: list[str], task_type: str) -> list[str]:
    distinct = set(values)
    if all(re.fullmatch(r"-?\d+", v) for v in distinct):
        return sorted(distinct, key=int)
    names = sorted(distinct)
    if task_type == "tagging" and "O" in distinct:  # the CoNLL convention: outside-any-entity first
        names = ["O"] + [n for n in names if n != "O"]
    return names


# ---------------------------------------------------------------------------------------------------- TFDS


def _base_name(dataset: str) -> str:
    """``glue/cola:2.0.0`` -> ``glue/cola``; ``squad/v2.0`` -> ``squad`` (configs that share a mapping)."""
    name = dataset.split(":")[0]
    return name if name in TFDS_FIELDS else name.split("/")[0]


def _import_builders() -> None:
    # TFDS registers dataset modules when their package is imported; glue and conll2003 live under
    # text, squad under question_answering, cnn_dailymail & co. under summarization. None needs TensorFlow.
    data_sources._import_text_builders()
    import tensorflow_datasets.question_answering  # noqa: F401
    import tensorflow_datasets.summarization  # noqa: F401


def _tfds_features(dataset: str, data_dir: str):
    import tensorflow_datasets as tfds

    _import_builders()
    name = f"TFDS dataset {dataset!r}"
    try:
        with data_sources.quiet_absl():
            return tfds.builder(dataset, data_dir=data_dir or None).info.features
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"{name} not found: check the name, or set the TFDS data_dir") from None
    except (ValueError, KeyError, AssertionError) as e:
        msg = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
        raise UserError(f"{name} cannot be opened: {msg}") from None


def _class_names(features, feature: str, dataset: str, task_type: str) -> list[str]:
    import tensorflow_datasets as tfds

    if feature not in features:
        raise UserError(f"TFDS dataset {dataset!r}: no feature {feature!r} (features: {', '.join(features.keys())})")
    f = features[feature]
    f = f.feature if task_type == "tagging" and hasattr(f, "feature") else f
    if not isinstance(f, tfds.features.ClassLabel):
        hint = "; use task type regression" if task_type == "classification" else ""
        raise UserError(f"TFDS dataset {dataset!r}: feature {feature!r} is not a class label{hint}")
    return list(f.names)


def _read_tfds(task_type: str, dataset: str, split: str, data_dir: str, text_fields) -> list[dict]:
    _import_builders()
    base = _base_name(dataset)
    if base == "glue/mnli":  # MNLI has two validation/test sets; plain "validation" means the matched one
        split = re.sub(r"^(validation|test)(?=$|\[)", r"\1_matched", split)
    source = data_sources.Tfds(dataset, data_dir)._source(split)
    features = _tfds_features(dataset, data_dir)  # from the builder: a data source need not carry its info
    fmap = field_map(task_type, text_fields, TFDS_FIELDS.get(base))
    inputs, target = FIELDS[task_type]
    missing = [f for k, f in fmap.items() if f not in features and k in (*inputs, target) and k != "text_pair"]
    if missing:
        raise UserError(
            f"TFDS dataset {dataset!r}: no feature {missing[0]!r} (features: {', '.join(features.keys())}); "
            "set text_fields to the features to use"
        )
    names = None
    if task_type in ("classification", "tagging"):
        names = _class_names(features, fmap[target], dataset, task_type)
    unlabelled = -1 if base.startswith("glue/") else None  # GLUE's test splits carry label -1
    out = []
    for i, rec in enumerate(_records(source)):
        ex = {"id": _text(rec[fmap["id"]]) if "id" in fmap and fmap["id"] in rec else f"{dataset}:{split}:{i}"}
        for k in inputs:
            if k in fmap and fmap[k] in rec:
                ex[k] = _tfds_value(rec[fmap[k]])
        if "text_pair" in inputs:
            ex.setdefault("text_pair", None)
        value = rec[fmap[target]]
        if task_type == "classification":
            ex["label"] = None if int(value) == unlabelled else int(value)
        elif task_type == "regression":
            ex["label"] = None if unlabelled is not None and float(value) == unlabelled else float(value)
        elif task_type == "tagging":
            ex["tags"] = [names[int(t)] for t in np.asarray(value).reshape(-1)]
            # Real CoNLL records pair every token with a tag; tfds.testing.mock_data draws the two
            # sequence lengths independently, so keep the common prefix.
            n = min(len(ex["tokens"]), len(ex["tags"]))
            ex["tokens"], ex["tags"] = ex["tokens"][:n], ex["tags"][:n]
        elif task_type == "qa":
            texts = [_text(t) for t in np.asarray(value["text"]).reshape(-1)]
            starts = [int(s) for s in np.asarray(value["answer_start"]).reshape(-1)]
            n = min(len(texts), len(starts))  # equal in real SQuAD; mock_data draws them independently
            ex["answers"] = {"text": texts[:n], "answer_start": starts[:n]}
        else:
            ex[target] = _text(value)
        if task_type != "qa":
            ex.pop("id")
        out.append(ex)
    return out


def _records(source, chunk: int = 1024):
    for i in range(0, len(source), chunk):
        indices = list(range(i, min(len(source), i + chunk)))
        try:  # one batched read where the source has it (ArrayRecord)
            yield from source.__getitems__(indices)
        except (AttributeError, TypeError):  # tfds.testing.mock_data's sources lack it
            yield from (source[j] for j in indices)


def _text(value) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _tfds_value(value):
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return [_text(v) for v in value]
    return _text(value)


# ----------------------------------------------------------------------------------------------- local files


def _split_file(folder: str, split: str) -> str | None:
    found = [os.path.join(folder, split + ext) for ext in (".jsonl", ".csv")]
    return next((p for p in found if os.path.isfile(p)), None)


def _local_file(path: str, split: str) -> str:
    if os.path.isdir(path):
        found = _split_file(path, split)
        if found is None:
            have = sorted(f for f in os.listdir(path) if f.endswith((".jsonl", ".csv")))
            raise UserError(
                f"{path}: no {split}.jsonl or {split}.csv for split {split!r} (there: {', '.join(have) or 'nothing'})"
            )
        return found
    if not os.path.isfile(path):
        raise UserError(f"task source {path!r}: no such file or folder; give a .jsonl/.csv file, a folder or tfds:NAME")
    if not path.endswith((".jsonl", ".csv")):
        raise UserError(f"{path}: task files are .jsonl or .csv")
    return path


def _label_file(path: str) -> str:
    if not os.path.isdir(path):
        return _local_file(path, "train")
    return _split_file(path, "train") or _local_file(path, "train")


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")  # tolerate the byte-order mark spreadsheets write
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None


def _raw_rows(path: str) -> list[tuple[int, dict]]:
    text = _read_text(path)
    rows = []
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object, not {type(row).__name__}")
            rows.append((n, row))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            n = reader.line_num
            if None in row:
                raise UserError(f"{path}:{n}: more values than the header has fields ({', '.join(reader.fieldnames)})")
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise UserError(f"{path}:{n}: no value for field {missing[0]!r}")
            if any(v.strip() for v in row.values()):
                rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: empty file (no examples)")
    return rows


def _read_local(task_type: str, path: str, fmap: dict[str, str]) -> list[tuple[int, dict]]:
    """[(line, canonical example with raw labels)], every field checked; errors name file, line and field."""
    rows = _raw_rows(path)
    inputs, target = FIELDS[task_type]
    source_target = fmap[target]
    allowed = {*fmap.values(), *_EXTRA}
    labelled = [source_target in row for _, row in rows]
    if any(labelled) and not all(labelled):
        n = rows[labelled.index(False)][0]
        raise UserError(f"{path}:{n}: no field {source_target!r}, which other lines have; label every line or none")
    out = []
    for n, row in rows:
        where = f"{path}:{n}"
        unknown = [k for k in row if k not in allowed]
        if unknown:
            raise UserError(
                f"{where}: unknown field {unknown[0]!r}; {task_type} files have fields "
                f"{', '.join(f for f in fmap.values())} (set text_fields to use other names)"
            )
        csv_file = path.endswith(".csv")
        ex = {}
        for k in inputs:
            name = fmap.get(k)
            if name is None or name not in row or (k == "text_pair" and row[name] in ("", None)):
                if k in OPTIONAL:
                    ex[k] = None
                    continue
                raise UserError(f"{where}: no field {name!r} (fields: {', '.join(row)})")
            ex[k] = _tokens(row[name], where, name, csv_file) if k == "tokens" else _string(row[name], where, name)
        ex[target] = None
        if all(labelled):
            ex[target] = _target(task_type, row[source_target], where, source_target, csv_file, ex)
        if task_type == "qa":
            ex["id"] = str(row["id"]) if row.get("id") not in (None, "") else f"{os.path.basename(path)}:{n}"
            if ex["answers"] is None:
                ex["answers"] = {"text": [], "answer_start": []}
        if task_type == "tagging" and ex["tags"] is not None and len(ex["tags"]) != len(ex["tokens"]):
            counts = f"{len(ex['tags'])} tags for {len(ex['tokens'])} tokens"
            raise UserError(f"{where}: field {source_target!r} has {counts}; give one tag per token")
        out.append((n, ex))
    return out


def _type_error(where: str, field: str, want: str, value) -> UserError:
    return UserError(f"{where}: field {field!r} must be {want}, not {type(value).__name__} {str(value)[:40]!r}")


def _string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise _type_error(where, field, "a string", value)
    if not value.strip():
        raise UserError(f"{where}: field {field!r} is empty")
    return value


def _tokens(value, where: str, field: str, csv_file: bool) -> list[str]:
    if csv_file and isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise _type_error(where, field, "a list of strings", value)
    if not value:
        raise UserError(f"{where}: field {field!r} is empty")
    return value


def _target(task_type: str, value, where: str, field: str, csv_file: bool, ex: dict):
    if task_type == "classification":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _type_error(where, field, "a class name (string or integer)", value)
        return str(value).strip()
    if task_type == "regression":
        try:
            number = float(value) if csv_file or not isinstance(value, (bool, str)) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number):
            raise _type_error(where, field, "a finite number", value)
        return number
    if task_type == "tagging":
        return _tokens(value, where, field, csv_file)
    if task_type == "qa":
        return _answers(value, where, field, csv_file, ex["context"])
    if not isinstance(value, str):
        raise _type_error(where, field, "a string", value)
    return value


def _answers(value, where: str, field: str, csv_file: bool, context: str) -> dict:
    if csv_file:
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            example = '{"text": [], "answer_start": []}'
            raise UserError(f"{where}: field {field!r} must be JSON like {example}") from None
    if isinstance(value, list) and all(isinstance(a, dict) for a in value):
        value = {"text": [a.get("text") for a in value], "answer_start": [a.get("answer_start") for a in value]}
    if not isinstance(value, dict) or set(value) != {"text", "answer_start"}:
        raise _type_error(where, field, '{"text": [...], "answer_start": [...]}', value)
    texts, starts = value["text"], value["answer_start"]
    if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
        raise UserError(f"{where}: field {field!r}: text and answer_start must be lists of the same length")
    for text, start in zip(texts, starts, strict=True):
        if not isinstance(text, str) or not text or isinstance(start, bool) or not isinstance(start, int):
            raise UserError(f"{where}: field {field!r}: each answer needs a text string and an integer answer_start")
        if context[start : start + len(text)] != text or start < 0:
            raise UserError(f"{where}: field {field!r}: answer {text[:40]!r} is not at answer_start {start} in context")
    return {"text": list(texts), "answer_start": list(starts)}


def _check_labels(task_type: str, rows: list[tuple[int, dict]], names: list[str], path: str, given: bool) -> None:
    """Labels (classification: replaced by their index) and tags must be in the label set."""
    names = [str(n) for n in names]  # a config may list integer labels; file labels are compared as text
    index = {n: i for i, n in enumerate(names)}
    shown = ", ".join(names[:_MAX_NAMES]) + (", ..." if len(names) > _MAX_NAMES else "")
    origin = "the task's labels" if given else "the label set of the training file"
    for n, ex in rows:
        key = "label" if task_type == "classification" else "tags"
        values = [] if ex[key] is None else ex[key] if task_type == "tagging" else [ex[key]]
        for v in values:
            if v not in index:
                raise UserError(f"{path}:{n}: field {key!r}: {v!r} is not in {origin} ({shown})")
        if task_type == "classification" and ex["label"] is not None:
            ex["label"] = index[ex["label"]]
