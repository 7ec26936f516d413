"""The family record (model/families.py): every row is complete -- a parity spec against transformers for
each of its Hugging Face formats, a tiny config with a run config, a fine-tuning head that builds -- and
what the rest of podformer reads from it agrees with it."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
from flax import nnx

from podformer import config as config_lib
from podformer import finetuning
from podformer.data import special
from podformer.model import families, heads, hf
from podformer.model.config import ModelConfig
from tests import zoo_helpers as zh
from tests.helpers import REPO

ROWS = list(families.FAMILIES.values())
# Pieces every podformer tokenizer has, whatever its token set (data/tokenizer.py).
ALWAYS = {"<s>", "</s>", "<pad>", "<unk>"}


def test_every_hugging_face_format_has_a_parity_spec():
    """Each format a row converts is tested against transformers (tests/zoo_helpers.py specs, run by
    tests/test_zoo_parity.py), and every format hf.py knows belongs to exactly one row."""
    transformers = pytest.importorskip("transformers")
    tested = {config.model_type for config, _ in zh.specs(transformers).values()}
    for row in ROWS:
        assert row.hf_formats, row.name
        assert not set(row.hf_formats) - tested, (row.name, set(row.hf_formats) - tested)
    claimed = [t for row in ROWS for t in row.hf_formats]
    assert sorted(claimed) == sorted(hf.FORMATS) and len(set(claimed)) == len(claimed)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_every_family_has_a_tiny_config_and_a_run_config(row):
    tiny = row.config.tiny()
    assert isinstance(tiny, ModelConfig) and families.of(tiny) is row
    assert tiny.d_model <= 128 and tiny.num_layers <= 4 and tiny.vocab_size <= 4096, tiny
    runs = [config_lib.load_config_file(f"{p}:tiny") for p in sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
            if hasattr(_module(p), "VARIANTS") and "tiny" in _module(p).VARIANTS]  # fmt: skip
    mine = [c for c in runs if c.model.family == row.name]
    assert mine, f"no configs/*.py:tiny trains {row.name}"
    assert mine[0].data.objective == row.objective
    assert config_lib.family_config(mine[0].model, row.config).num_layers <= 4


def _module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_families_test_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_every_family_has_a_fine_tuning_head_that_builds(row):
    """Its heads are the ones its kind can fine-tune (podformer/finetuning.py), and each builds on the
    tiny backbone (shapes only: nothing is computed)."""
    assert row.heads and set(row.heads) <= set(heads.HEADS)
    trainable = {finetuning.HEAD_OF[t] for t, kinds in finetuning.KINDS_OF.items() if row.kind in kinds}
    assert set(row.heads) == trainable, (row.name, row.heads, trainable)
    module_cls = row.module_class()
    for head in row.heads:
        model = nnx.eval_shape(
            lambda h=head: heads.FineTuneModel(
                module_cls(row.config.tiny(), rngs=nnx.Rngs(0)), row.name, h, 3, dropout=0.0, rngs=nnx.Rngs(1)
            )
        )
        assert model.kind == row.kind and (model.head is None) == (head == "lm")


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_rows_are_consistent(row):
    assert row.kind in families.KINDS and families.get(row.name) is row
    assert row.objective in special.OBJECTIVE_TOKENS
    tokens = special.OBJECTIVE_TOKENS[row.objective]
    for piece in (row.framing.start, row.framing.sep):  # what an exported tokenizer adds must exist
        assert piece is None or piece in ALWAYS | set(tokens.symbols), (row.name, piece)
    assert row.framing.decoder_start in ("pad", "eos")
    assert dataclasses.is_dataclass(row.config) and row.config.__dataclass_params__.frozen
    assert [r.name for r in ROWS if r.config is row.config] == [row.name]  # a config class names one family
