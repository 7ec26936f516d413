"""`train.py --config=configs/<family>.py:tiny` trains every non-GPT family with its pretraining objective on
the embedded corpus (in-process, shrunk further) and its validation loss falls; BERT starts from a Hugging
Face folder through `init.checkpoint`, DistilBERT is distilled from a BERT teacher workdir."""

import numpy as np
import pytest

from podformer import train
from podformer.core.errors import UserError
from podformer.data import tokenizer
from podformer.model import hf
from podformer.model.bert import DistilBertConfig
from tests.helpers import read_metrics, train_losses

transformers = pytest.importorskip("transformers")

VOCAB = 1024
STEPS = 16
# Smaller than the tiny variants: one layer (per stack), no evaluation.
SMALL = [
    "--config.model.d_model=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=4",
    "--config.model.d_ff=64",
    "--config.train.seq_len=32",
    "--config.train.batch_size=8",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.eval_steps=2",
    "--config.train.eval_every=0",
    "--config.train.eval_at_start=true",
    "--config.opt.warmup_steps=2",
    "--config.metrics.peak_tflops=1",
]
EXTRA = {"t5": ["--config.model.head_dim=8", "--config.model.num_decoder_layers=1"], "bart": []}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The embedded corpus (the Python standard library's sources) and one small tokenizer trained on it
    with every family's special tokens (T5 sentinels too), shared by all families' runs."""
    cache = tmp_path_factory.mktemp("zoo_cache")
    tok = str(cache / "all.model")
    tokenizer.main(
        [
            "train",
            "--source=embedded",
            "--family=all",
            "--type=bpe",
            f"--vocab-size={VOCAB}",
            "--max-documents=400",
            f"--output={tok}",
        ]
    )
    return [
        "--config.data.source=embedded",
        f"--config.data.tokenizer={tok}",
        f"--config.data.cache_dir={cache}",
        f"--config.model.vocab_size={VOCAB}",
    ]


def _hf_folder(family: str, path: str) -> str:
    """A transformers model with the SMALL sizes, saved: what init.checkpoint starts from."""
    T = transformers
    if family == "bert":
        config = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=128)  # fmt: skip
        T.BertForPreTraining(config).save_pretrained(path)
    else:
        config = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                    max_position_embeddings=128)  # fmt: skip
        T.DistilBertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "t5", "bart"])
def test_tiny_config_trains_and_the_loss_falls(family, corpus, tmp_path):
    args = [f"--config=configs/{family}.py:tiny", *corpus, *SMALL, *EXTRA.get(family, [])]
    init = None
    workdir = str(tmp_path / "run")
    if family == "bert":  # from a Hugging Face folder
        init = _hf_folder("bert", str(tmp_path / "hf"))
        # One step first: its update has learning rate 0 (warmup starts there), so the checkpoint holds
        # exactly the initial parameters and exports back to the Hugging Face tensors bit for bit. The
        # run below then resumes from it (the workdir's checkpoint comes before init.checkpoint).
        steps = [f"--config.init.checkpoint={init}", f"--workdir={workdir}"]
        train.run([*args, *steps, "--config.train.steps=1"])
        out = str(tmp_path / "out")
        hf.export_workdir(workdir, out)
        a, b = hf.read_safetensors(f"{init}/model.safetensors"), hf.read_safetensors(f"{out}/model.safetensors")
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    elif family == "distilbert":  # distilled from a BERT teacher: a podformer workdir `model.hf import` wrote
        teacher = str(tmp_path / "teacher")
        assert hf.main(["import", _hf_folder("bert", str(tmp_path / "hf")), teacher]) == 0
        with pytest.raises(UserError, match="distill.teacher=.*no such workdir"):
            train.run([*args, f"--config.distill.teacher={tmp_path}/none", f"--workdir={workdir}"])
        args.append(f"--config.distill.teacher={teacher}")
        with pytest.raises(UserError, match="holds imported parameters"):  # it is not a run to resume
            train.run([*args, f"--workdir={teacher}"])
    train.run([*args, *([f"--config.init.checkpoint={init}"] if init else []), f"--workdir={workdir}"])

    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in range(STEPS - 2, STEPS + 1)])
    assert last < first - 0.2, losses
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(workdir) if "eval_loss" in m}
    assert 0 in evals and STEPS in evals and evals[STEPS] < evals[0] - 0.2, evals
    if family == "distilbert":  # the teacher comes back from the checkpoint on resume
        train.run([*args, f"--config.train.steps={STEPS + 2}", f"--workdir={workdir}"])
        assert sorted(train_losses(workdir)) == list(range(1, STEPS + 3))


def test_init_checkpoint_of_another_model_is_refused(tmp_path):
    path = _hf_folder("distilbert", str(tmp_path / "hf"))
    cfg = DistilBertConfig.tiny(vocab_size=VOCAB, d_model=64, num_layers=1, num_heads=4)
    with pytest.raises(UserError, match="different model than the run config.*d_model: 32 != 64"):
        train.init_from(path, "distilbert", cfg, None, None)
    with pytest.raises(UserError, match="family: distilbert != bert"):
        train.init_from(path, "bert", cfg, None, None)
