"""Task flows for finetune.py: read a split, turn it into feature rows, and score predictions.

Data and metrics come from data/tasks/sources.py and podformer/task_metrics.py; the layouts from
data/tasks/features.py. ``evaluate`` returns (metrics, one prediction record per example), the records
being what ``<workdir>/predictions.jsonl`` holds.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from podformer import task_metrics
from podformer.core.errors import UserError
from podformer.data.tasks import embedded, features, qa, sources

# The metric the best checkpoint is chosen by, when task.metric is '' (GLUE: the official one per task).
GLUE_METRIC = {"cola": "mcc", "stsb": "pearson", "mrpc": "f1", "qqp": "f1", "ax": "mcc"}
DEFAULT_METRIC = {
    "classification": "accuracy",
    "regression": "pearson",
    "qa": "f1",
    "tagging": "f1",
    "text2text": "rougeL",
    "sft": "loss",
}


@dataclasses.dataclass
class Task:
    cfg: object  # the config's task section
    type: str
    label_names: list[str] | None
    glue: str | None  # GLUE task name (official metrics), else None
    version_2: bool  # SQuAD 2.0: questions may have no answer
    _cache: dict = dataclasses.field(default_factory=dict)

    @property
    def metric(self) -> str:
        if self.cfg.metric:
            return self.cfg.metric
        return GLUE_METRIC.get(self.glue, DEFAULT_METRIC[self.type]) if self.glue else DEFAULT_METRIC[self.type]

    @property
    def mode(self) -> str:
        return "min" if self.metric in ("loss", "mse") else "max"

    @property
    def num_outputs(self) -> int:
        if self.type == "regression":
            return 1
        if self.type == "qa":
            return 2
        return len(self.label_names or ())

    def read(self, split: str, limit: int = 0) -> list[dict]:
        if (split, limit) not in self._cache:
            self._cache[split, limit] = self._read(split, limit)
        return self._cache[split, limit]

    def _read(self, split: str, limit: int) -> list[dict]:
        c = self.cfg
        if c.source == "embedded":
            examples = embedded.examples(split)
        else:
            examples = sources.read_examples(
                self.type,
                c.source,
                split,
                data_dir=c.data_dir or None,
                text_fields=tuple(c.text_fields) or None,
                labels=self.label_names if self.type in ("classification", "tagging") else None,
            )
        if not examples:
            raise UserError(f"task.source={c.source}: the {split} split has no examples")
        return examples[:limit] if limit else examples


def make_task(tcfg, *, label_names: list[str] | None = None) -> Task:
    """The task of the config's task section (no data read: see ``label_names``)."""
    if tcfg.type not in DEFAULT_METRIC:
        raise UserError(f"task.type={tcfg.type!r}; choose one of {', '.join(DEFAULT_METRIC)}")
    src = tcfg.source
    glue = src.split("/", 1)[1].split(":")[0] if src.startswith("tfds:glue/") else None
    return Task(tcfg, tcfg.type, label_names, glue, "squad/v2" in src)


def label_names(task: Task) -> list[str] | None:
    """Class or tag names: the embedded task's packages, TFDS ClassLabel names, or a local file's distinct
    labels (read from its train split)."""
    if task.type not in ("classification", "tagging"):
        return None
    src = task.cfg.source
    if src == "embedded":
        return list(embedded.CLASSES)
    c = task.cfg
    return sources.label_names(task.type, src, data_dir=c.data_dir or None, text_fields=tuple(c.text_fields) or None)


def _metrics(task: Task, pred: list, gold: list) -> dict:
    if task.glue:
        return task_metrics.glue(task.glue, pred, gold)
    return (task_metrics.classification if task.type == "classification" else task_metrics.regression)(pred, gold)


def baseline(task: Task, train_labels: list, examples: list[dict]) -> dict:
    """The metrics of the trivial predictor: the train split's majority class, or its mean (regression)."""
    if task.type == "classification":
        constant = collections.Counter(train_labels).most_common(1)[0][0]
    else:
        constant = float(np.mean(train_labels))
    return _metrics(task, [constant] * len(examples), [ex["label"] for ex in examples])


def rows(task: Task, examples: list[dict], tok, lay, seq_len: int, *, training: bool) -> dict[str, np.ndarray]:
    """Feature rows for ``examples`` (QA: one row per doc-stride window, with example_index/offsets)."""
    c = task.cfg
    if task.type in ("classification", "regression"):
        return features.sequence(examples, tok, lay, seq_len, regression=task.type == "regression")
    if task.type == "tagging":
        return features.tagging(examples, tok, lay, seq_len, task.label_names)
    if task.type == "text2text":
        return features.text2text(examples, tok, lay, seq_len, c.target_len, prefix=c.prefix)
    if task.type == "sft":
        return features.sft(examples, tok, lay, seq_len)
    w = qa.make_windows(
        examples,
        tok,
        max_len=seq_len,
        doc_stride=c.doc_stride,
        max_query_len=c.max_query_len,
        cls_id=lay.start if lay.start is not None else lay.sep,
        sep_id=lay.sep,
        pad_id=lay.pad,
        training=training,
    )
    seg = w["attention_mask"].astype(np.int32)
    out = {
        "inputs": w["input_ids"].astype(np.int32),
        "segment_ids": seg,
        "positions": np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32) * seg,
        "label_weights": np.ones(len(seg), np.float32),
    }
    if lay.token_types:
        out["token_types"] = w["token_type_ids"].astype(np.int32)
    for key in ("start_positions", "end_positions"):
        out[key] = (w[key] if training else np.zeros(len(seg))).astype(np.int32)
    if not training:
        out["example_index"] = w["example_index"]
        out["offsets"] = w["offsets"]
    return out


MODEL_KEYS_DROPPED = ("word_ids", "example_index", "offsets")  # host-side decoding aids, not model inputs


TARGET = {"classification": "label", "regression": "label", "qa": "answers", "tagging": "tags"}
TARGET.update(text2text="targets", sft="completion")


def labelled(task: Task, examples: list[dict]) -> bool:
    """Unlabelled examples (GLUE's test splits, files without the target field) are predicted, not scored."""
    return all(ex.get(TARGET[task.type]) is not None for ex in examples)


def score(task: Task, examples: list[dict], outputs, rows_: dict[str, np.ndarray], tok) -> tuple[dict, list[dict]]:
    """(metrics, predictions) from the model's outputs for ``examples``: head outputs for classification,
    regression, QA and tagging (already cut to the real rows), generated texts for text2text and sft."""
    scored = labelled(task, examples)
    if task.type == "classification":
        pred = np.argmax(outputs, axis=-1).tolist()
        names = task.label_names
        records = [
            {"index": i, "prediction": names[p], **({"label": names[ex["label"]]} if scored else {})}
            for i, (p, ex) in enumerate(zip(pred, examples, strict=True))
        ]
        if not scored:
            return {}, records
        return _metrics(task, pred, [ex["label"] for ex in examples]), records
    if task.type == "regression":
        pred = [float(x) for x in np.asarray(outputs).reshape(-1)]
        records = [
            {"index": i, "prediction": p, "label": ex.get("label")}
            for i, (p, ex) in enumerate(zip(pred, examples, strict=True))
        ]
        if not scored:
            return {}, records
        return _metrics(task, pred, [float(ex["label"]) for ex in examples]), records
    if task.type == "tagging":
        names = task.label_names
        preds = []
        for i, ex in enumerate(examples):
            tags = ["O"] * len(ex["tokens"])
            for pos in np.nonzero(rows_["word_ids"][i] >= 0)[0]:
                tags[rows_["word_ids"][i][pos]] = names[int(outputs[i][pos])]
            preds.append(tags)
        records = [
            {"tokens": ex["tokens"], "prediction": p, "tags": ex["tags"]} for ex, p in zip(examples, preds, strict=True)
        ]
        return (task_metrics.entities(preds, [ex["tags"] for ex in examples]) if scored else {}), records
    if task.type == "qa":
        c = task.cfg
        windows = {k: rows_[k] for k in ("example_index", "offsets")}
        windows.update(input_ids=rows_["inputs"], attention_mask=rows_["segment_ids"])
        answers = qa.decode_answers(
            examples,
            windows,
            outputs[..., 0],
            outputs[..., 1],
            n_best=c.n_best,
            max_answer_len=c.max_answer_len,
            version_2=task.version_2,
            null_threshold=c.null_threshold,
        )
        records = [
            {"id": ex["id"], "prediction": answers.get(ex["id"], ""), "answers": (ex["answers"] or {}).get("text")}
            for ex in examples
        ]
        return (task_metrics.squad(answers, examples, version_2=task.version_2) if scored else {}), records
    source, target = ("inputs", "targets") if task.type == "text2text" else ("prompt", "completion")
    records = [
        {source: ex[source], "prediction": p, target: ex[target]} for ex, p in zip(examples, outputs, strict=True)
    ]
    return (task_metrics.text(list(outputs), [ex[target] for ex in examples]) if scored else {}), records


def decode(tok, ids: np.ndarray, eos: int | None, pad: int) -> list[str]:
    """Generated ids (B, T) -> texts, cut at the first end-of-sequence token."""
    texts = []
    for row in np.asarray(ids):
        row = [int(t) for t in row]
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(tok.decode([t for t in row if t != pad]))
    return texts
