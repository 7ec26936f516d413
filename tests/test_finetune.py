"""finetune.py end to end: every task type on tfds.testing.mock_data and on local JSONL files, from a tiny
podformer checkpoint and from tiny Hugging Face folders, in train, eval and predict modes; the embedded
default beats its baseline; a tiny encoder learns a small classification set built here to near-perfect
accuracy."""

import dataclasses
import json
import os
import random
import re

import pytest
import tensorflow_datasets as tfds

from podformer import finetune, generate_cli, train
from podformer.data.tasks import embedded
from podformer.model import hf
from tests.helpers import SMALL

WORDS = "the a of to and in is was for on good bad great awful fine poor red blue green cat dog paris london".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]
V = 256  # vocabulary of every tiny model here (the tokenizer has fewer)
TINY = ["--config.train.batch_size=8", "--config.train.eval_batch_size=8", "--config.train.seq_len=48"]
TINY += ["--config.train.log_every=2", "--config.opt.warmup_steps=2", "--config.mesh.devices=1"]


def _tokenizer_files(folder, texts):
    """A WordPiece tokenizer.json trained here (no download) with BERT's and BART's special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS))
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    special = {
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "bos_token": "<s>",
        "eos_token": "</s>",
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)


def _corpus():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)]
    return texts + ["abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"-()"]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs here compile the same programs again and again (the same tiny architectures, train/eval/predict
    of one workdir): JAX's persistent compilation cache serves the repeats."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    for k, v in saved.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints sharing one tokenizer: a podformer BERT workdir (the layout `python -m podformer.model.hf
    import` writes), and Hugging Face folders of random transformers BERT, GPT-2, T5 and BART models."""
    import transformers as T

    from podformer.model import bert, params

    root = tmp_path_factory.mktemp("ckpts")
    texts = _corpus()
    out = {}
    pod = root / "podformer_bert"
    cfg = bert.BertConfig.tiny(vocab_size=V, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=64)
    cfg = dataclasses.replace(cfg, pooler=False, nsp_head=False, scan_layers=False)
    from flax import nnx

    params.save_workdir(str(pod), bert.Bert(cfg, rngs=nnx.Rngs(0)), "bert")
    _tokenizer_files(str(pod / "tokenizer"), texts)
    out["podformer"] = str(pod)
    sizes = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    t5 = dict(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0)
    t5.update(eos_token_id=6, decoder_start_token_id=0)
    bart = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2)
    bart.update(decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    specs = {
        "bert": T.BertForMaskedLM(T.BertConfig(**sizes, max_position_embeddings=64)),
        "gpt2": T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
        "t5": T.T5ForConditionalGeneration(T.T5Config(**t5)),
        "bart": T.BartForConditionalGeneration(T.BartConfig(**bart)),
    }
    for name, model in specs.items():
        folder = root / f"hf_{name}"
        model.save_pretrained(str(folder))
        _tokenizer_files(str(folder), texts)
        out[name] = str(folder)
    for name in ("t5", "gpt2"):  # podformer workdirs of these too, as `python -m podformer.model.hf import` writes them
        workdir = root / f"podformer_{name}"
        assert hf.main(["import", out[name], str(workdir)]) == 0
        _tokenizer_files(str(workdir / "tokenizer"), texts)
        out[f"podformer_{name}"] = str(workdir)
    return out


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _predictions(workdir):
    with open(os.path.join(workdir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def _run(config, ckpt, workdir, *extra):
    args = [f"--config={config}", f"--config.init.checkpoint={ckpt}", f"--workdir={workdir}", *TINY, *extra]
    return finetune.run(args)


@pytest.mark.slow
def test_embedded_default_beats_the_majority_baseline(tmp_path, monkeypatch, capsys):
    """`python finetune.py` with no flags picks up runs/gpt_tiny, the default train.py run's workdir (here a
    2-step run of a smaller GPT), classifies stdlib snippets by package, and prints test accuracy next to
    the majority-class baseline -- which it clearly beats."""
    monkeypatch.chdir(tmp_path)
    train.run([*SMALL, "--config.train.steps=2", "--config.checkpoint.every=2", "--workdir=runs/gpt_tiny"])
    result = finetune.run(["--config.train.steps=120", "--config.train.seq_len=64", "--config.train.eval_every=0"])
    out = capsys.readouterr().out
    assert "model gpt from runs/gpt_tiny" in out
    m = re.search(r"test accuracy ([\d.]+) vs majority-class baseline ([\d.]+)", out)
    assert m, out
    accuracy, baseline = float(m.group(1)), float(m.group(2))
    assert accuracy == pytest.approx(result["test"]["accuracy"], abs=1e-4)
    assert baseline == pytest.approx(result["test_baseline"]["accuracy"], abs=1e-4)
    # 717 test snippets: the accuracy's standard error is under 0.02, so +0.08 is well beyond chance (the full
    # default run -- the 4-layer GPT, 150 steps of 128 tokens -- reaches ~0.80 against 0.49).
    assert accuracy > baseline + 0.08, (accuracy, baseline)
    assert {p["prediction"] for p in _predictions(result["workdir"])} <= set(embedded.CLASSES)


def test_glue_on_mock_data_train_eval_predict_from_a_podformer_checkpoint(ckpts, tmp_path, capsys):
    """glue/mrpc (a pair task, F1 chosen as the best-checkpoint metric) from a podformer BERT workdir, then
    the workdir scored in eval mode and predicted in predict mode; training it again says it is complete."""
    cfg = "configs/finetune/glue.py:tiny"
    src = ["--config.task.source=tfds:glue/mrpc", "--config.train.steps=4", "--config.train.eval_every=2"]
    with tfds.testing.mock_data(num_examples=16):
        trained = _run(cfg, ckpts["podformer"], tmp_path, *src)
        assert set(trained["validation"]) == {"accuracy", "f1"} and trained["best_step"] in (2, 4)
        assert generate_cli.best_step(str(tmp_path)) == trained["best_step"]  # what --step=best loads
        capsys.readouterr()
        assert _run(cfg, "", tmp_path, *src)["complete"]  # nothing trained, evaluated or compiled again
        (line,) = capsys.readouterr().out.strip().splitlines()
        assert line.startswith(f"podformer: {tmp_path} is complete (step 4 of 4; best f1 ") and "train.steps" in line
        evaluated = _run(cfg, "", tmp_path, *src, "--config.mode=eval")
        assert evaluated["validation"] == trained["validation"]
        _run(cfg, "", tmp_path, *src, "--config.mode=predict", "--config.task.predict_split=test")
    preds = _predictions(str(tmp_path))
    assert len(preds) == 16 and {p["prediction"] for p in preds} <= {"not_equivalent", "equivalent"}
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert any("eval_f1" in x for x in lines) and any("loss" in x for x in lines)
    assert (tmp_path / "curves.png").stat().st_size > 20_000  # with the task metrics' panel (test_look)


@pytest.mark.slow
def test_stsb_regression_from_a_gpt2_folder(ckpts, tmp_path):
    """A decoder (read at its last real token) as a regressor on glue/stsb; Pearson/Spearman reported."""
    with tfds.testing.mock_data(num_examples=16):
        result = _run(
            "configs/finetune/glue.py:gpt_tiny",
            ckpts["gpt2"],
            tmp_path,
            "--config.task.source=tfds:glue/stsb",
            "--config.task.type=regression",
            "--config.train.steps=3",
            "--config.opt.layer_decay=0.8",
        )
    assert set(result["validation"]) == {"pearson", "spearman"}
    assert "validation_baseline" in result


def test_a_tiny_encoder_learns_a_small_classification_set(ckpts, tmp_path):
    """From a random BERT folder: which colour word a sentence mentions, with distractor words around it,
    from a local JSONL file -- the head, loss and label handling must all be right to get near 100%."""
    rng = random.Random(1)
    colours = ["red", "blue", "green"]

    def rows(n):
        out = []
        for _ in range(n):
            c = rng.choice(colours)
            words = [rng.choice(WORDS[:10]) for _ in range(6)]
            words.insert(rng.randrange(7), c)
            out.append({"text": " ".join(words), "label": c})
        return out

    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", rows(400))
    _write_jsonl(data / "validation.jsonl", rows(64))
    result = _run(
        "configs/finetune/glue.py:bert_tiny",
        ckpts["bert"],
        tmp_path / "run",
        f"--config.task.source={data}",
        "--config.train.steps=100",
        "--config.train.batch_size=16",
        "--config.train.eval_every=0",
        "--config.opt.lr=2e-3",
        "--config.opt.schedule=constant",
        "--config.model.dropout=0.0",
    )
    assert result["validation"]["accuracy"] >= 0.95, result


@pytest.mark.slow
def test_squad_v2_on_mock_data_and_local_qa_jsonl(ckpts, tmp_path):
    """SQuAD v2.0 (mock records) from the podformer checkpoint; then the fine-tuned workdir predicts a local
    JSONL file whose contexts are longer than one window, from a BERT folder-trained run."""
    cfg = "configs/finetune/squad.py:tiny"
    windows = ["--config.task.doc_stride=8", "--config.task.max_query_len=16", "--config.train.steps=2"]
    with tfds.testing.mock_data(num_examples=8):
        result = _run(cfg, ckpts["podformer"], tmp_path / "mock", "--config.task.source=tfds:squad/v2.0", *windows)
    assert set(result["validation"]) >= {"exact_match", "f1"}
    context = " ".join(["the cat was in paris and the dog was in london"] * 6)
    rows = [{"id": f"q{i}", "question": "where was the dog", "context": context,
             "answers": {"text": ["london"], "answer_start": [context.index("london")]}} for i in range(8)]  # fmt: skip
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    local = ["--config.task.source=" + path, *windows]
    result = _run(cfg, ckpts["bert"], tmp_path / "local", *local)
    assert 0 <= result["validation"]["f1"] <= 100
    preds = _predictions(str(tmp_path / "local"))
    assert [p["id"] for p in preds] == [r["id"] for r in rows] and all(p["prediction"] in context for p in preds)


@pytest.mark.slow
def test_conll_on_mock_data_and_local_tagging_jsonl(ckpts, tmp_path):
    """CoNLL-2003 (mock) from a BERT folder; a local tokens/tags file from the podformer checkpoint, then
    predicted: every word gets a tag, entity-level F1 is reported."""
    cfg = "configs/finetune/conll.py:tiny"
    with tfds.testing.mock_data(num_examples=8):
        result = _run(cfg, ckpts["bert"], tmp_path / "mock", "--config.train.steps=2")
    assert set(result["validation"]) == {"precision", "recall", "f1", "accuracy"}
    rows = [{"tokens": ["the", "cat", "in", "paris"], "tags": ["O", "O", "O", "B-LOC"]},
            {"tokens": ["london", "is", "blue"], "tags": ["B-LOC", "O", "O"]}] * 4  # fmt: skip
    path = _write_jsonl(tmp_path / "ner.jsonl", rows)
    _run(cfg, ckpts["podformer"], tmp_path / "local", f"--config.task.source={path}", "--config.train.steps=2")
    preds = _predictions(str(tmp_path / "local"))
    assert [len(p["prediction"]) for p in preds] == [len(r["tokens"]) for r in rows]
    assert {t for p in preds for t in p["prediction"]} <= {"O", "B-LOC"}


@pytest.mark.slow
def test_text2text_on_mock_data_and_jsonl_from_t5_and_bart_folders(ckpts, tmp_path):
    """Summarisation (mock xsum) from a podformer T5 workdir with beam search; a local inputs/targets file
    from a BART folder with greedy decoding, then predicted; ROUGE/BLEU/exact match reported."""
    cfg = "configs/finetune/text2text.py:tiny"
    with tfds.testing.mock_data(num_examples=8):
        args = ["--config.train.steps=2", "--config.task.num_beams=2"]
        result = _run(cfg, ckpts["podformer_t5"], tmp_path / "mock", *args)
    assert {"rougeL", "bleu", "exact_match", "loss"} <= set(result["validation"])
    rows = [{"inputs": f"the {w} cat", "targets": w} for w in WORDS[:8]]
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    bart = [f"--config.task.source={path}", "--config.train.steps=2", "--config.task.prefix="]
    _run(cfg, ckpts["bart"], tmp_path / "local", *bart)
    _run(cfg, "", tmp_path / "local", *bart, "--config.mode=predict")
    preds = _predictions(str(tmp_path / "local"))
    assert len(preds) == 8 and all(isinstance(p["prediction"], str) for p in preds)


@pytest.mark.slow
def test_sft_from_a_gpt2_folder_loss_on_completions(ckpts, tmp_path):
    """Prompt/completion JSONL on a GPT-2 folder: the completion loss falls, completions are generated; the
    same from a podformer GPT-2 workdir, then its eval and predict modes."""
    rows = [{"prompt": f"colour of {w}:", "completion": " red"} for w in WORDS[:16]]
    path = _write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg, src = "configs/finetune/sft.py:tiny", f"--config.task.source={path}"
    result = _run(cfg, ckpts["gpt2"], tmp_path, src,
                  "--config.train.steps=20", "--config.train.eval_every=10", "--config.opt.lr=3e-3")  # fmt: skip
    evals = [x for x in map(json.loads, open(tmp_path / "metrics.jsonl")) if "eval_loss" in x]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"rougeL", "exact_match"} <= set(result["validation"])
    assert len(_predictions(str(tmp_path))) == 16
    pod = tmp_path / "from_podformer"
    _run(cfg, ckpts["podformer_gpt2"], pod, src, "--config.train.steps=2")
    scored = _run(cfg, "", pod, src, "--config.mode=eval")
    assert {"rougeL", "exact_match"} <= set(scored["validation"])
    _run(cfg, "", pod, src, "--config.mode=predict")
    assert len(_predictions(str(pod))) == 16
