"""Fine-tuning metrics: the reference libraries (scikit-learn, scipy, seqeval, sacrebleu, rouge-score),
and SQuAD's answer normalisation, exact match and F1 written out from the official evaluation scripts
(v1.1 and v2.0), which no maintained library packages.

Scales: classification/regression/GLUE/entities in [0, 1] (as the libraries return them); SQuAD, ROUGE,
BLEU and text exact match in [0, 100] (as the official SQuAD script and sacrebleu report them).
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from podformer.core.errors import UserError

# The official GLUE metric(s) per task (the GLUE benchmark paper, Table 1; AX is scored as CoLA is).
GLUE_METRICS = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("mcc",),
}


def glue(task: str, predictions, labels) -> dict[str, float]:
    """The official metric(s) of a GLUE task (``cola``, ``glue/cola`` or ``tfds:glue/cola:2.0.0``)."""
    name = task.removeprefix("tfds:").split(":")[0].removeprefix("glue/")
    if name not in GLUE_METRICS:
        raise UserError(f"GLUE task {task!r}: choose one of {', '.join(GLUE_METRICS)}")
    if name == "stsb":
        scores = regression(predictions, labels)
    else:
        scores = classification(predictions, labels)
        if "f1" in GLUE_METRICS[name]:  # MRPC and QQP: F1 of the positive class (paraphrase/duplicate = 1)
            from sklearn.metrics import f1_score

            scores["f1"] = float(f1_score(np.asarray(labels), np.asarray(predictions), average="binary"))
    return {k: scores[k] for k in GLUE_METRICS[name]}


def classification(predictions, labels) -> dict[str, float]:
    """Accuracy, macro-averaged F1 and Matthews correlation (scikit-learn)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    y_pred, y_true = np.asarray(predictions), np.asarray(labels)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, average="macro")),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
    }


def regression(predictions, labels) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy) and mean squared error (scikit-learn)."""
    from scipy import stats
    from sklearn.metrics import mean_squared_error

    y_pred, y_true = np.asarray(predictions, np.float64), np.asarray(labels, np.float64)
    out = {"mse": float(mean_squared_error(y_true, y_pred))}
    if np.ptp(y_pred) == 0 or np.ptp(y_true) == 0:
        # Correlation is undefined for constant input (an untrained head predicts one value); report 0 --
        # no correlation -- as scikit-learn's Matthews correlation does, so best-checkpoint comparisons work.
        return out | {"pearson": 0.0, "spearman": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return out | {
            "pearson": float(stats.pearsonr(y_pred, y_true)[0]),
            "spearman": float(stats.spearmanr(y_pred, y_true)[0]),
        }


def entities(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (seqeval's default CoNLL evaluation) and token accuracy."""
    from seqeval import metrics

    pred, gold = [list(t) for t in pred_tags], [list(t) for t in gold_tags]
    return {
        "precision": float(metrics.precision_score(gold, pred, zero_division=0)),
        "recall": float(metrics.recall_score(gold, pred, zero_division=0)),
        "f1": float(metrics.f1_score(gold, pred, zero_division=0)),
        "accuracy": float(metrics.accuracy_score(gold, pred)),
    }


def text(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (rouge-score, stemmed, averaged), corpus BLEU (sacrebleu) and exact match."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions:
        raise ValueError("text(): no predictions")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = list(zip(predictions, references, strict=True))
    scores = [scorer.score(ref, pred) for pred, ref in pairs]
    out = {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")}
    out["bleu"] = float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)
    out["exact_match"] = 100 * float(np.mean([p.strip() == r.strip() for p, r in pairs]))
    return out


# ---------------------------------------------------------------- SQuAD (official v1.1 / v2.0 scripts' rules)


_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (in that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str, version_2: bool) -> float:
    pred_toks, gold_toks = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version_2 and (not pred_toks or not gold_toks):
        # v2.0: a no-answer gold (or an empty prediction) scores 1 only when both are empty.
        return float(pred_toks == gold_toks)
    num_same = sum((collections.Counter(pred_toks) & collections.Counter(gold_toks)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Mapping[str, str], examples: Sequence[dict], *, version_2: bool = False) -> dict[str, float]:
    """Exact match and F1 (0-100), each the max over an example's gold answers, averaged over examples.
    v2.0 rules (``version_2``): golds that normalise to empty are dropped, no gold answer means the only
    correct prediction is "" and v2.0's F1 of empty strings; also has-answer / no-answer breakdowns. A
    missing prediction scores 0 (v1.1's rule)."""
    exact, f1, has_answer = [], [], []
    for ex in examples:
        golds = list(ex["answers"]["text"])
        if version_2:
            golds = [g for g in golds if normalize_answer(g)]
        golds = golds or [""]
        has_answer.append(golds != [""])
        if ex["id"] not in predictions:
            exact.append(0.0)
            f1.append(0.0)
            continue
        pred = predictions[ex["id"]]
        exact.append(max(_exact(pred, g) for g in golds))
        f1.append(max(_f1(pred, g, version_2) for g in golds))
    if not exact:
        raise ValueError("squad(): no examples")
    exact, f1, has_answer = np.asarray(exact), np.asarray(f1), np.asarray(has_answer)
    out = {"exact_match": 100 * float(exact.mean()), "f1": 100 * float(f1.mean())}
    if version_2:
        for name, mask in (("has_answer", has_answer), ("no_answer", ~has_answer)):
            if mask.any():
                out[f"{name}_exact_match"] = 100 * float(exact[mask].mean())
                out[f"{name}_f1"] = 100 * float(f1[mask].mean())
    return out
