"""Task metrics equal the reference implementations on fixed inputs: golden values from scikit-learn,
numpy, seqeval and sacrebleu called directly, and hand-worked cases of the official SQuAD rules."""

import numpy as np
import pytest

from podformer import task_metrics
from podformer.core.errors import UserError

PRED = [0, 1, 1, 0, 1, 2, 2, 0, 1, 1]
GOLD = [0, 1, 0, 0, 1, 2, 1, 0, 2, 1]


def test_classification_matches_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    got = task_metrics.classification(PRED, GOLD)
    assert got["accuracy"] == pytest.approx(0.7)  # 7 of 10 by hand
    assert got["f1"] == pytest.approx(f1_score(GOLD, PRED, average="macro"))
    assert got["mcc"] == pytest.approx(matthews_corrcoef(GOLD, PRED))
    assert got["accuracy"] == pytest.approx(accuracy_score(GOLD, PRED))


def test_glue_reports_each_tasks_official_metrics():
    from sklearn.metrics import matthews_corrcoef

    binary_pred, binary_gold = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert task_metrics.glue("cola", binary_pred, binary_gold) == pytest.approx(
        {"mcc": matthews_corrcoef(binary_gold, binary_pred)}
    )
    # MRPC/QQP F1 of the positive class, by hand: tp=2, fp=1, fn=1 -> 2/3; accuracy 4/6.
    assert task_metrics.glue("tfds:glue/mrpc:2.0.0", binary_pred, binary_gold) == pytest.approx(
        {"accuracy": 4 / 6, "f1": 2 / 3}
    )
    assert task_metrics.glue("glue/mnli", PRED, GOLD) == pytest.approx({"accuracy": 0.7})
    x, y = [0.1, 2.0, 3.5, 1.0, 4.9], [0.5, 1.5, 4.0, 0.2, 3.0]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731  (no ties)
    assert task_metrics.glue("stsb", x, y) == pytest.approx(
        {"pearson": np.corrcoef(x, y)[0, 1], "spearman": np.corrcoef(rank(x), rank(y))[0, 1]}
    )
    with pytest.raises(UserError, match="GLUE task 'colaa'"):
        task_metrics.glue("colaa", PRED, GOLD)


def test_regression_matches_numpy_and_constant_predictions_give_zero_correlation():
    x, y = [1.0, 2.0, 3.0, 4.0], [1.5, 1.0, 3.5, 5.0]
    got = task_metrics.regression(x, y)
    assert got["mse"] == pytest.approx(np.mean((np.array(x) - np.array(y)) ** 2))
    assert got["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert got["spearman"] == pytest.approx(np.corrcoef([0, 1, 2, 3], [1, 0, 2, 3])[0, 1])
    assert task_metrics.regression([2.0] * 4, y) | {"mse": 0} == {"mse": 0, "pearson": 0.0, "spearman": 0.0}


def test_entities_match_seqeval_and_a_hand_count():
    from seqeval.metrics import f1_score, precision_score, recall_score

    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    got = task_metrics.entities(pred, gold)
    # By hand: gold entities PER, LOC, ORG, MISC(2); predicted PER, ORG(wrong place), ORG, MISC(1 token) ->
    # 2 of 4 predicted are right, 2 of 4 gold are found.
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(0.5)
    assert got["f1"] == pytest.approx(f1_score(gold, pred)) == pytest.approx(0.5)
    assert got["precision"] == pytest.approx(precision_score(gold, pred))
    assert got["recall"] == pytest.approx(recall_score(gold, pred))
    assert got["accuracy"] == pytest.approx(6 / 8)


def test_text_metrics_match_sacrebleu_and_hand_worked_rouge():
    import sacrebleu

    preds = ["the cat sat", "a dog barked loudly today", "exactly this"]
    refs = ["the cat ran", "a dog barked loudly yesterday", "exactly this"]
    got = task_metrics.text(preds, refs)
    # ROUGE by hand: unigram F 2/3, 4/5, 1; bigram F 1/2, 3/4, 1; LCS F 2/3, 4/5, 1.
    assert got["rouge1"] == pytest.approx(100 * (2 / 3 + 4 / 5 + 1) / 3)
    assert got["rouge2"] == pytest.approx(100 * (1 / 2 + 3 / 4 + 1) / 3)
    assert got["rougeL"] == pytest.approx(100 * (2 / 3 + 4 / 5 + 1) / 3)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert got["exact_match"] == pytest.approx(100 / 3)


def _qa(id_, *golds):
    return {"id": id_, "question": "?", "context": " ".join(golds), "answers": {"text": list(golds),
            "answer_start": [0] * len(golds)}}  # fmt: skip


def test_squad_answer_normalisation_follows_the_official_rules():
    norm = task_metrics.normalize_answer
    assert norm("The  Eiffel Tower!") == "eiffel tower"
    assert norm("an apple, a day") == "apple day"
    assert norm("Theater of the U.S.A.") == "theater of usa"  # articles only as whole words
    assert norm("  A\tB\nc ") == "b c"  # "A" is an article; tabs and newlines are whitespace
    assert norm("Über-Straße") == "überstraße"  # punctuation dropped, non-ASCII kept


def test_squad_v1_exact_match_and_f1_by_hand():
    examples = [
        _qa("1", "Eiffel Tower", "the tower"),  # EM via normalisation
        _qa("2", "Paris"),  # pred "in Paris France": P 1/3, R 1 -> F1 1/2
        _qa("3", "Denver Broncos", "Broncos"),  # pred "Carolina Panthers": 0; max over golds
        _qa("4", "blue green"),  # pred "green blue red": P 2/3, R 1 -> F1 4/5, EM 0
        _qa("5", "missing"),  # no prediction: 0 (v1.1's rule)
    ]
    preds = {"1": "the Eiffel tower.", "2": "in Paris France", "3": "Carolina Panthers", "4": "green blue red"}
    got = task_metrics.squad(preds, examples)
    assert got["exact_match"] == pytest.approx(100 * 1 / 5)
    assert got["f1"] == pytest.approx(100 * (1 + 0.5 + 0 + 0.8 + 0) / 5)
    # Common tokens count with multiplicity: pred "a b b" ("a" is an article: dropped) vs gold "b c": 1 common,
    # P 1/2, R 1/2 -> F1 1/2.
    assert task_metrics.squad({"x": "a b b"}, [_qa("x", "b c")])["f1"] == pytest.approx(50.0)


def test_squad_v2_no_answer_rules_by_hand():
    examples = [
        _qa("has", "Ada"),
        {"id": "none", "question": "?", "context": "c", "answers": {"text": [], "answer_start": []}},
        {"id": "none2", "question": "?", "context": "c", "answers": {"text": [], "answer_start": []}},
        _qa("article", "the", "Lovelace"),  # gold "the" normalises to empty: dropped under v2
    ]
    preds = {"has": "Ada", "none": "", "none2": "something", "article": "Lovelace"}
    got = task_metrics.squad(preds, examples, version_2=True)
    assert got["exact_match"] == pytest.approx(75.0) and got["f1"] == pytest.approx(75.0)
    assert got["has_answer_exact_match"] == 100.0 and got["no_answer_f1"] == 50.0
    # v2.0: "" against a no-answer gold is F1 1; v1.1's F1 gives 0 for no common tokens.
    empty = [{"id": "e", "question": "?", "context": "c", "answers": {"text": [], "answer_start": []}}]
    assert task_metrics.squad({"e": ""}, empty, version_2=True)["f1"] == 100.0
    assert task_metrics.squad({"e": ""}, empty)["f1"] == 0.0
    assert task_metrics.squad({"e": ""}, empty)["exact_match"] == 100.0
