"""Fine-tuning pieces on their own: heads on every family, feature layouts (pairs, first sub-token labels,
completion-only SFT weights), layer-wise lr decay, and one-line errors for bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from podformer import finetune, finetuning
from podformer.core.errors import UserError
from podformer.data.tasks import features
from podformer.model import bert, families, gpt, heads, t5
from tests.helpers import REPO, env
from tests.test_finetune import _tokenizer_files


class Tok:
    """A whitespace tokenizer with BERT's and GPT's specials, enough for layouts."""

    vocab_size, pad_id, bos_id, eos_id = 64, 0, 1, 2
    pieces = {"[CLS]": 3, "[SEP]": 4, "<unk>": 5}

    def piece_to_id(self, p):
        return self.pieces.get(p)

    def id_to_piece(self, i):
        return str(i)

    def encode(self, text):
        return [10 + len(w) for w in text.split()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


FAMILIES = {
    "bert": bert.BertConfig.tiny(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=32),
    "gpt": gpt.GPTConfig.tiny(vocab_size=64, d_model=16, num_layers=2, num_heads=2, max_len=32),
    "t5": t5.T5Config.tiny(vocab_size=64, d_model=16, num_layers=2, num_heads=2, head_dim=8, d_ff=32),
}
MODULES = {"bert": bert.Bert, "gpt": gpt.GPT, "t5": t5.T5}


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_head_reads_the_right_token_and_ignores_padding(family):
    """Outputs (B, C) that do not change when padding is appended: encoders read [CLS], decoders and
    encoder-decoders the last real token."""
    cfg = FAMILIES[family]
    row = families.get(family)
    model = heads.FineTuneModel(
        MODULES[family](cfg, rngs=nnx.Rngs(0)), family, "sequence", 3, dropout=0.0, rngs=nnx.Rngs(1)
    )
    lay = features.layout(row.framing, row.kind, Tok(), what=family, type_vocab_size=getattr(cfg, "type_vocab_size", 0))
    ex = [{"text": "a bb ccc", "text_pair": "dddd e", "label": 1}]
    short, long = features.sequence(ex, Tok(), lay, 12), features.sequence(ex, Tok(), lay, 20)
    forward = nnx.jit(lambda m, batch: m(batch))  # one compiled program, not op-by-op dispatch
    a = forward(model, {k: jnp.asarray(v) for k, v in short.items()})
    b = forward(model, {k: jnp.asarray(v) for k, v in long.items()})
    assert a.shape == (1, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _layout(family: str, tok, **kw):
    row = families.get(family)
    return features.layout(row.framing, row.kind, tok, what=family, **kw)


def test_layouts_follow_the_reference_formats():
    ex = [{"text": "a bb", "text_pair": "ccc", "label": 0}]
    enc = features.sequence(ex, Tok(), _layout("bert", Tok(), type_vocab_size=2), 10)
    assert enc["inputs"][0].tolist() == [3, 11, 12, 4, 13, 4, 0, 0, 0, 0]  # [CLS] a bb [SEP] ccc [SEP]
    assert enc["token_types"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    dec = features.sequence(ex, Tok(), _layout("gpt", Tok()), 8)
    assert dec["inputs"][0].tolist()[:6] == [1, 11, 12, 2, 13, 2]  # <bos> a bb <eos> ccc <eos>
    s2s = features.sequence(ex, Tok(), _layout("t5", Tok()), 8)
    assert s2s["encoder_inputs"][0].tolist()[:5] == [11, 12, 2, 13, 2]
    assert s2s["decoder_inputs"][0].tolist()[:5] == [0, 11, 12, 2, 13]  # shifted right after T5's start (pad)


def test_tagging_labels_first_subtokens_and_sft_weights_the_completion():
    tok = Tok()
    tok.encode = lambda text: [10 + len(w)] * len(w.strip()) if (w := text) else []  # one piece per character
    lay = _layout("bert", tok, type_vocab_size=2)
    rows = features.tagging([{"tokens": ["ab", "c"], "tags": ["B-PER", "O"]}], tok, lay, 10, ["O", "B-PER"])
    assert rows["label_weights"][0].tolist()[:5] == [0, 1, 0, 1, 0]  # [CLS] a(b) b c [SEP]
    assert rows["labels"][0].tolist()[:4] == [0, 1, 0, 0] and rows["word_ids"][0].tolist()[:5] == [-1, 0, -1, 1, -1]
    lay = _layout("gpt", Tok())
    rows = features.sft([{"prompt": "a bb", "completion": "ccc"}], Tok(), lay, 8)
    # <bos> a bb ccc <eos>: the targets after "bb" (ccc) and after "ccc" (<eos>) are trained
    assert rows["inputs"][0].tolist()[:4] == [1, 11, 12, 13] and rows["targets"][0].tolist()[:4] == [11, 12, 13, 2]
    assert rows["loss_weights"][0].tolist()[:5] == [0, 0, 1, 1, 0]


def test_layer_decay_scales_updates_by_depth():
    factor = finetuning.layer_decay(0.5, 2)
    K = jax.tree_util.DictKey
    u = jnp.ones((2, 3))
    assert factor((K("model"), K("head"), K("out")), u) == 1.0
    assert factor((K("model"), K("backbone"), K("blocks"), K("layers"), K(1), K("w")), u) == 0.5
    assert factor((K("model"), K("backbone"), K("embed")), u) == 0.125
    scanned = factor((K("model"), K("backbone"), K("blocks"), K("layers"), K("attn")), u)
    np.testing.assert_allclose(np.asarray(scanned)[:, 0], [0.25, 0.5])  # layers 0 and 1 of a scanned stack


def _one_line(match, args):
    with pytest.raises(UserError, match=match) as e:
        finetune.run(args)
    assert "\n" not in str(e.value)


def test_bad_input_gets_one_line_errors(tmp_path):
    """An incompatible checkpoint family, wrong field names, labels outside the label set, an empty file,
    eval without a fine-tuned workdir, a bad mode: one line each, before any compilation."""
    from podformer.model import params

    ckpt = tmp_path / "bert"
    params.save_workdir(str(ckpt), bert.Bert(FAMILIES["bert"], rngs=nnx.Rngs(0)), "bert")
    _tokenizer_files(str(ckpt / "tokenizer"), ["a b c d e f g h"])
    w = [f"--workdir={tmp_path / 'run'}"]
    _one_line(r"holds a bert model \(an encoder\); task.type=sft", ["--config=configs/finetune/sft.py:tiny",
              f"--config.init.checkpoint={ckpt}", *w])  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"sentence": "a", "label": "x"}) + "\n")
    glue = [
        "--config=configs/finetune/glue.py:tiny",
        f"--config.task.source={data}",
        "--config.train.seq_len=16",
        f"--config.init.checkpoint={ckpt}",
        *w,
    ]
    _one_line(r"train\.jsonl:1: unknown field 'sentence'", glue)
    (data / "train.jsonl").write_text("".join(json.dumps({"text": "a", "label": c}) + "\n" for c in "xy"))
    (data / "validation.jsonl").write_text(json.dumps({"text": "b", "label": "z"}) + "\n")
    _one_line(r"validation\.jsonl:1: field 'label': 'z' is not in the task's labels", glue)
    (data / "train.jsonl").write_text("")
    _one_line(r"train\.jsonl.*empty", glue)
    _one_line(r"mode=eval needs a fine-tuned --workdir", [*glue, "--config.mode=eval"])
    _one_line(r"mode='serve'; choose one of train, eval, predict", [*glue, "--config.mode=serve"])
    _one_line(r"does not exist", [*glue[:-2], *w, f"--config.init.checkpoint={tmp_path / 'nowhere'}"])
    sft = ["--config=configs/finetune/sft.py:tiny", f"--config.init.checkpoint={ckpt}", *w]
    proc = subprocess.run(
        [sys.executable, f"{REPO}/finetune.py", *sft], env=env(1), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("podformer: error: ")
