"""`train.py --config=configs/<family>.py:tiny` trains every non-GPT family (in-process, shrunk further),
and `init.checkpoint` starts a run from a Hugging Face folder or an imported workdir."""

import numpy as np
import pytest

import train
from model import hf
from podformer.errors import UserError
from tests.helpers import train_losses

# Smaller than the tiny variants (same 4096-token tokenizer, so the corpus is tokenized once).
SMALL = [
    "--config.model.d_model=32",
    "--config.model.num_heads=4",
    "--config.model.d_ff=64",
    "--config.train.seq_len=32",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.eval_steps=1",
    "--config.opt.warmup_steps=2",
    "--config.metrics.peak_tflops=1",
]
STEPS = 16


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "t5", "bart"])
def test_tiny_config_trains_and_the_loss_falls(family, tmp_path):
    extra = ["--config.model.head_dim=8"] if family == "t5" else []
    train.run(
        [f"--config=configs/{family}.py:tiny", *SMALL, *extra, f"--config.train.steps={STEPS}", f"--workdir={tmp_path}"]
    )
    losses = train_losses(str(tmp_path))
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert last < first - 0.3, losses


def test_init_checkpoint_from_a_hugging_face_folder(tmp_path):
    """Start from a transformers DistilBERT (lr 0, one step): the run's checkpoint exports back to exactly
    the original tensors. An imported workdir is refused as a --workdir to resume."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(
        vocab_size=4096, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128
    )
    src = str(tmp_path / "hf")
    transformers.DistilBertForMaskedLM(config).save_pretrained(src)
    workdir = str(tmp_path / "run")
    args = ["--config=configs/distilbert.py:tiny", *SMALL, "--config.train.steps=1", "--config.opt.lr=0"]
    train.run([*args, f"--config.init.checkpoint={src}", f"--workdir={workdir}"])
    out = str(tmp_path / "out")
    hf.export_workdir(workdir, out)
    a, b = hf.read_safetensors(f"{src}/model.safetensors"), hf.read_safetensors(f"{out}/model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)

    imported = str(tmp_path / "imported")
    hf.import_folder(src, imported)
    with pytest.raises(UserError, match="holds imported parameters"):
        train.run([*args, f"--workdir={imported}"])
    with pytest.raises(UserError, match="different model than the run config.*d_model: 32 != 64"):
        bigger = [*args, "--config.model.d_model=64", f"--config.init.checkpoint={imported}"]
        train.run([*bigger, f"--workdir={tmp_path}/x"])
