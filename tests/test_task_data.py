"""Fine-tuning task examples: every TFDS mapping through tfds.testing.mock_data (random records, and
records with known values), a real ArrayRecord dataset, local JSONL/CSV for each task type, and one-line
errors that name the file, line and field."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from podformer.core.errors import UserError
from podformer.data import sources as data_sources
from podformer.data.tasks import sources

GLUE_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def _one_line(match, fn, *args, **kwargs):
    with pytest.raises(UserError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_every_tfds_mapping_on_mock_data():
    """Random records of each dataset's real feature spec come out in the canonical schema."""
    cases = [("classification", f"glue/{n}") for n in GLUE_LABELS] + [
        ("regression", "glue/stsb"),
        ("qa", "squad/v1.1"),
        ("qa", "squad/v2.0"),
        ("tagging", "conll2003"),
        ("text2text", "cnn_dailymail"),
    ]
    with tfds.testing.mock_data(num_examples=3):
        for task_type, name in cases:
            names = sources.label_names(task_type, f"tfds:{name}")
            for split in ("train", "validation"):
                examples = sources.read_examples(task_type, f"tfds:{name}", split)
                assert len(examples) == 3, name
                for ex in examples:
                    if task_type == "classification":
                        assert names == GLUE_LABELS[name.split("/")[1]]
                        assert set(ex) == {"text", "text_pair", "label"} and ex["label"] in range(len(names))
                        assert isinstance(ex["text"], str)
                        assert (ex["text_pair"] is None) == (name in ("glue/cola", "glue/sst2")), name
                    elif task_type == "regression":
                        assert names is None and isinstance(ex["label"], float) and isinstance(ex["text_pair"], str)
                    elif task_type == "qa":
                        assert set(ex) == {"id", "question", "context", "answers"} and isinstance(ex["context"], str)
                        texts, starts = ex["answers"]["text"], ex["answers"]["answer_start"]
                        assert len(texts) == len(starts) and all(isinstance(t, str) for t in texts)
                    elif task_type == "tagging":
                        assert names == CONLL_TAGS and set(ex) == {"tokens", "tags"}
                        assert len(ex["tokens"]) == len(ex["tags"]) and set(ex["tags"]) <= set(CONLL_TAGS)
                    else:
                        assert set(ex) == {"inputs", "targets"} and isinstance(ex["targets"], str)


def _known_records(builder, split, **kwargs):
    """Records as an ArrayRecord source returns them (Text features as bytes), with known values."""
    config = builder.builder_config.name if builder.builder_config else ""
    calls.append((builder.name, config, split))
    if builder.name == "glue":
        fields = sources.GLUE[config]
        label = 2.5 if config == "stsb" else 1
        rec = {f: f"{config} {f}".encode() for f in fields} | {"label": label, "idx": 0}
        return [rec, rec | {"label": -1.0 if config == "stsb" else -1}]  # -1: GLUE's unlabelled test rows
    if builder.name == "squad":
        context = "Paris is the capital of France."
        answers = {"text": [b"Paris", b"Paris"], "answer_start": [0, 0]}
        return [
            {"id": b"q1", "title": b"t", "question": b"Capital?", "context": context.encode(), "answers": answers},
            {"id": b"q2", "title": b"t", "question": b"Moon?", "context": context.encode(),
             "answers": {"text": [], "answer_start": []}, "is_impossible": True},
        ]  # fmt: skip
    if builder.name == "conll2003":
        return [{"tokens": [b"EU", b"rejects", b"German", b"call"], "ner": [3, 0, 7, 0], "pos": [], "chunks": []}]
    raise AssertionError(builder.name)


calls = []


def test_tfds_mappings_put_each_feature_in_its_field():
    calls.clear()
    with tfds.testing.mock_data(as_data_source_fn=_known_records):
        for config, fields in sources.GLUE.items():
            if config == "ax":
                continue
            task_type = "regression" if config == "stsb" else "classification"
            labelled, unlabelled = sources.read_examples(task_type, f"tfds:glue/{config}:2.0.0", "validation")
            assert labelled["text"] == f"{config} {fields[0]}"
            assert labelled["text_pair"] == (f"{config} {fields[1]}" if len(fields) > 1 else None)
            assert labelled["label"] == (2.5 if config == "stsb" else 1) and unlabelled["label"] is None
        # MNLI's plain "validation" is its matched validation set.
        assert ("glue", "mnli", "validation_matched") in calls
        sources.read_examples("classification", "tfds:glue/mnli", "validation_mismatched")
        assert calls[-1] == ("glue", "mnli", "validation_mismatched")
        q1, q2 = sources.read_examples("qa", "tfds:squad/v2.0", "validation")
        assert q1 == {
            "id": "q1",
            "question": "Capital?",
            "context": "Paris is the capital of France.",
            "answers": {"text": ["Paris", "Paris"], "answer_start": [0, 0]},
        }
        assert q2["answers"] == {"text": [], "answer_start": []}
        (ner,) = sources.read_examples("tagging", "tfds:conll2003", "train")
        assert ner == {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]}
        # A float label is not a class label; a feature that is not there is named with the dataset's features.
        _one_line(r"glue/stsb.*'label' is not a class label; use task type regression",
                  sources.read_examples, "classification", "tfds:glue/stsb", "train")  # fmt: skip
        _one_line(r"glue/cola.*no feature 'nope' \(features: sentence, label, idx\)",
                  sources.read_examples, "classification", "tfds:glue/cola", "train", text_fields="nope")  # fmt: skip
        _one_line("no_such_dataset_xyz.*not found", sources.read_examples, "qa", "tfds:no_such_dataset_xyz", "train")


def test_a_real_array_record_dataset_and_a_missing_split(tmp_path):
    """The same reader on a real (locally built) ArrayRecord dataset: bytes decoded, batched reads; a split
    the dataset lacks is named."""
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document number {i}")
    spec = data_sources.parse_spec(f"files:{tmp_path / 'corpus'}", validation_percent=0, cache_dir=str(tmp_path))
    builder = spec.prepare()
    source = f"tfds:podformer_local_corpus/{builder.builder_config.name}"
    data_dir = os.path.join(str(tmp_path), "tfds")

    def read(split):
        return sources.read_examples("text2text", source, split, data_dir=data_dir, text_fields="text,text")

    examples = read("train")
    assert sorted(e["inputs"] for e in examples) == [f"document number {i}" for i in range(3)]
    assert all(e["inputs"] == e["targets"] for e in examples)
    _one_line(r"podformer_local_corpus/.*no split 'test'", read, "test")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


LOCAL = {
    "classification": [
        {"text": "good film", "label": "pos"},
        {"text": "bad", "text_pair": "film", "label": "neg", "id": 7},
    ],
    "regression": [{"text": "a", "text_pair": "b", "label": 3}, {"text": "c", "text_pair": "d", "label": 0.5}],
    "qa": [
        {"id": "x", "question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}},
        {"question": "When?", "context": "Ada wrote it.", "answers": [{"text": "wrote", "answer_start": 4}]},
        {"question": "Why?", "context": "Ada wrote it.", "answers": []},
    ],
    "tagging": [{"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]}],
    "text2text": [{"inputs": "summarize: long text", "targets": "short"}],
    "sft": [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}],
}
EXPECTED = {
    "classification": [
        {"text": "good film", "text_pair": None, "label": 1},
        {"text": "bad", "text_pair": "film", "label": 0},
    ],
    "regression": [{"text": "a", "text_pair": "b", "label": 3.0}, {"text": "c", "text_pair": "d", "label": 0.5}],
    "qa": [
        {"id": "x", "question": "Who?", "context": "Ada wrote it.", "answers": {"text": ["Ada"], "answer_start": [0]}},
        {
            "id": "train.jsonl:2",
            "question": "When?",
            "context": "Ada wrote it.",
            "answers": {"text": ["wrote"], "answer_start": [4]},
        },
        {
            "id": "train.jsonl:3",
            "question": "Why?",
            "context": "Ada wrote it.",
            "answers": {"text": [], "answer_start": []},
        },
    ],  # fmt: skip
    "tagging": [{"tokens": ["Ada", "Lovelace", "wrote"], "tags": ["B-PER", "I-PER", "O"]}],
    "text2text": [{"inputs": "summarize: long text", "targets": "short"}],
    "sft": [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}],
}
CSV = {
    "classification": 'text,text_pair,label\ngood film,,pos\nbad,film,neg\n',
    "regression": "text,text_pair,label\na,b,3\nc,d,0.5\n",
    "qa": 'id,question,context,answers\nx,Who?,Ada wrote it.,"{""text"": [""Ada""], ""answer_start"": [0]}"\n'
    'train.csv:3,When?,Ada wrote it.,"[{""text"": ""wrote"", ""answer_start"": 4}]"\n'
    "train.csv:4,Why?,Ada wrote it.,\n",
    "tagging": "tokens,tags\nAda Lovelace wrote,B-PER I-PER O\n",
    "text2text": "inputs,targets\nsummarize: long text,short\n",
    "sft": 'prompt,completion\n"Q: 2+2?\nA:", 4\n',
}  # fmt: skip


@pytest.mark.parametrize("task_type", list(LOCAL))
def test_local_jsonl_and_csv_for_each_task_type(task_type, tmp_path):
    jsonl = tmp_path / "j"
    jsonl.mkdir()
    _write_jsonl(jsonl / "train.jsonl", LOCAL[task_type])
    assert sources.read_examples(task_type, str(jsonl), "train") == EXPECTED[task_type]
    assert sources.read_examples(task_type, str(jsonl / "train.jsonl"), "ignored") == EXPECTED[task_type]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.csv").write_text(CSV[task_type])
    expected = EXPECTED[task_type]
    if task_type == "qa":  # CSV line numbers: the header is line 1
        expected = [e | {"id": e["id"].replace("jsonl:2", "csv:3").replace("jsonl:3", "csv:4")} for e in expected]
    assert sources.read_examples(task_type, f"files:{tmp_path / 'c'}", "train") == expected
    names = sources.label_names(task_type, str(jsonl))
    assert names == {"classification": ["neg", "pos"], "tagging": ["O", "B-PER", "I-PER"]}.get(task_type)


def test_label_sets_come_from_the_training_file_or_the_task(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 10}, {"text": "y", "label": 2}])
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": "z", "label": 10}])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "u"}, {"text": "v"}])  # unlabelled: predict mode
    assert sources.label_names("classification", str(tmp_path)) == ["2", "10"]  # integers sort numerically
    assert sources.read_examples("classification", str(tmp_path), "validation") == [
        {"text": "z", "text_pair": None, "label": 1}
    ]
    assert [e["label"] for e in sources.read_examples("classification", str(tmp_path), "test")] == [None, None]
    given = sources.read_examples("classification", str(tmp_path), "train", labels=["10", "2", "7"])
    assert [e["label"] for e in given] == [0, 1]
    _write_jsonl(tmp_path / "validation.jsonl", [{"text": "z", "label": 10}, {"text": "w", "label": 3}])
    _one_line(r"validation\.jsonl:2: field 'label': '3' is not in the label set of the training file \(2, 10\)",
              sources.read_examples, "classification", str(tmp_path), "validation")  # fmt: skip
    _one_line(r"train\.jsonl:1: field 'label': '10' is not in the task's labels \(a, b\)",
              sources.read_examples, "classification", str(tmp_path), "train", labels=["a", "b"])  # fmt: skip
    tags = [{"tokens": ["a"], "tags": ["O"]}]
    (tmp_path / "t").mkdir()
    _write_jsonl(tmp_path / "t" / "train.jsonl", tags)
    _write_jsonl(tmp_path / "t" / "validation.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "B-XYZ"]}])
    _one_line(r"validation\.jsonl:1: field 'tags': 'B-XYZ' is not in the label set",
              sources.read_examples, "tagging", str(tmp_path / "t"), "validation")  # fmt: skip
    # Named fields map onto the canonical ones.
    _write_jsonl(tmp_path / "g.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1.5}])
    got = sources.read_examples(
        "regression", str(tmp_path / "g.jsonl"), "train", text_fields="sentence1,sentence2,score"
    )
    assert got == [{"text": "a", "text_pair": "b", "label": 1.5}]


def test_bad_local_files_get_one_line_errors_naming_file_line_and_field(tmp_path):
    def err(match, task_type, rows=None, *, name="f.jsonl", content=None):
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        else:
            _write_jsonl(path, rows)
        return _one_line(match, sources.read_examples, task_type, str(path), "train")

    ok = {"text": "fine", "label": "a"}
    err(r"f\.jsonl:2: unknown field 'sentence'; classification files have fields text, text_pair, label",
        "classification", [ok, {"sentence": "x", "label": "a"}])  # fmt: skip
    err(r"f\.jsonl:1: no field 'text' \(fields: label\)", "classification", [{"label": "a"}])
    err(r"f\.jsonl:2: no field 'label', which other lines have", "classification", [ok, {"text": "x"}])
    err(r"f\.jsonl: empty file", "classification", content="\n  \n")
    err(r"f\.csv: empty file", "classification", name="f.csv", content="text,label\n")
    err(r"f\.jsonl:3: not UTF-8 text", "classification", content=b'{"text": "a", "label": "x"}\n\n{"text": "\xff"}\n')
    err(r"f\.jsonl:1: not valid JSON", "classification", content='{"text": "a", label: 1}\n')
    err(r"f\.jsonl:1: field 'label' must be a class name \(string or integer\), not list",
        "classification", [{"text": "a", "label": ["x"]}])  # fmt: skip
    err(r"f\.jsonl:1: field 'text' must be a string, not int", "classification", [{"text": 5, "label": "a"}])
    err(r"f\.jsonl:1: field 'label' must be a finite number, not str", "regression", [{"text": "a", "label": "0.5"}])
    err(r"f\.csv:3: field 'label' must be a finite number, not str 'high'", "regression", name="f.csv",
        content="text,label\na,1\nb,high\n")  # fmt: skip
    err(r"f\.csv:2: more values than the header", "regression", name="f.csv", content="text,label\na,1,2\n")
    err(r"f\.jsonl:1: field 'tokens' must be a list of strings, not str", "tagging", [{"tokens": "a b", "tags": ["O"]}])
    err(r"f\.jsonl:1: field 'tags' has 1 tags for 2 tokens", "tagging", [{"tokens": ["a", "b"], "tags": ["O"]}])
    ctx = "Ada wrote it."
    err(r"f\.jsonl:1: field 'answers': answer 'Ada' is not at answer_start 1 in context", "qa",
        [{"question": "q", "context": ctx, "answers": {"text": ["Ada"], "answer_start": [1]}}])  # fmt: skip
    err(r"f\.jsonl:1: field 'answers': text and answer_start must be lists of the same length", "qa",
        [{"question": "q", "context": ctx, "answers": {"text": ["Ada"], "answer_start": []}}])  # fmt: skip
    err(r"f\.jsonl:1: field 'inputs' is empty", "text2text", [{"inputs": " ", "targets": "x"}])
    _one_line(r"nowhere\.jsonl'?: no such file", sources.read_examples, "sft", str(tmp_path / "nowhere.jsonl"), "train")
    _one_line(r"no validation\.jsonl or validation\.csv for split 'validation' \(there: f\.csv, f\.jsonl\)",
              sources.read_examples, "sft", str(tmp_path), "validation")  # fmt: skip
    _one_line("task type 'ner': choose one of", sources.read_examples, "ner", str(tmp_path), "train")
