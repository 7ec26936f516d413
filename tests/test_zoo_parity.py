"""Every family against transformers: imported logits, exported folders, bit-exact round trips, sharding."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from podformer.configs.common import RULES
from podformer.model import hf, params
from tests import zoo_helpers as zh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NAMES = list(zh.specs(transformers))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (transformers model, its folder), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name))
            cache[name] = (zh.make_reference(name, path), path)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_import_export_match_transformers(name, reference, tmp_path):
    """Imported logits match on a padded batch; the exported folder loads in transformers with the same
    logits; and its tensors are the original ones bit for bit, from either layer layout."""
    ref, path = reference(name)
    b = zh.batch(name)
    keep = zh.valid(name, b)
    expected = zh.reference_logits(name, ref, b)
    # Alternate the layer layout across families; the round trip below covers both for every family.
    model = hf.from_pretrained(path, scan_layers=NAMES.index(name) % 2 == 0)
    got = zh.our_logits(name, model, b)
    assert got.shape == expected.shape
    assert np.abs(got - expected)[keep].max() < 1e-4

    out = str(tmp_path / "export")
    hf.save_pretrained(model, out, base_config=hf.read_config(path))
    reloaded = type(ref).from_pretrained(out).eval()
    assert np.abs(zh.reference_logits(name, reloaded, b) - got)[keep].max() < 1e-4

    original = hf.read_safetensors(os.path.join(path, "model.safetensors"))
    for scan in (True, False):
        hf.save_pretrained(hf.from_pretrained(path, scan_layers=scan), out, base_config=hf.read_config(path))
        exported = hf.read_safetensors(os.path.join(out, "model.safetensors"))
        assert sorted(exported) == sorted(original)
        for k, v in original.items():
            assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_type"] == hf.read_config(path)["model_type"]


@pytest.mark.parametrize("name", ["llama", "bert", "t5_v1_1"])
def test_sharded_forward_equals_unsharded(name, reference):
    """fsdp=4 x tensor=2 over 8 fake devices: parameters placed by the logical rules, same logits."""
    _, path = reference(name)
    b = zh.batch(name)
    expected = zh.our_logits(name, hf.from_pretrained(path), b)
    # podformer's mesh axes (mesh.AXES): the rules name every one (embed over fsdp and expert).
    mesh = jax.make_mesh((1, 4, 1, 2), ("data", "fsdp", "expert", "tensor"), axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        model = hf.from_pretrained(path)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=_is_var)
        specs = {v.get_value().sharding.spec for v in leaves}
        assert any(any(s is not None for s in spec) for spec in specs), "nothing was sharded"
        got = zh.our_logits(name, model, b)
    keep = zh.valid(name, b)
    assert np.abs(np.asarray(got) - expected)[keep].max() < 1e-5


def _is_var(x):
    return isinstance(x, nnx.Variable)


def test_bert_pooler_and_next_sentence_head(reference):
    ref, path = reference("bert")
    b = zh.batch("bert")
    model = hf.from_pretrained(path)
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in b.items()})
    nsp = nnx.jit(lambda m, *args: m.nsp_logits(m.encode(*args)))
    got = nsp(model, *[jnp.asarray(b[k]) for k in zh.ENCODER_INPUTS])
    assert np.abs(np.asarray(got) - out.seq_relationship_logits.numpy()).max() < 1e-4


def test_bare_base_model_loads_with_a_fresh_head(tmp_path, capsys):
    """A BertModel folder (no MLM head, no 'bert.' prefix): the encoder matches, the head starts fresh."""
    config, _ = zh.specs(transformers)["bert"]
    torch.manual_seed(0)
    ref = transformers.BertModel(config).eval()
    ref.save_pretrained(tmp_path)
    model = hf.from_pretrained(str(tmp_path))
    assert "mlm_dense.kernel" in capsys.readouterr().err
    b = zh.batch("bert")
    with torch.no_grad():
        expected = ref(**{k: torch.tensor(v) for k, v in b.items()}).last_hidden_state.numpy()
    got = nnx.jit(lambda m, *args: m.encode(*args))(model, *[jnp.asarray(b[k]) for k in zh.ENCODER_INPUTS])
    assert np.abs(np.asarray(got) - expected)[zh.valid("bert", b)].max() < 1e-4


def test_sharded_folders_and_bin_files(reference, tmp_path):
    """Sharded safetensors (transformers' and ours) and pytorch_model.bin, single and sharded, read the same."""
    ref, path = reference("gpt2")
    b = zh.batch("gpt2")
    expected = zh.our_logits("gpt2", hf.from_pretrained(path), b)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items() if not k.startswith("lm_head")}
    config = open(os.path.join(path, "config.json")).read()

    def folder(name):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(config)
        return d

    d = folder("hf_sharded")
    ref.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    ours = folder("ours_sharded")
    hf.save_pretrained(hf.from_pretrained(path), str(ours), max_shard_bytes=20_000)
    assert len(list(ours.glob("model-*.safetensors"))) > 2
    d_bin = folder("bin")
    torch.save(sd, d_bin / "pytorch_model.bin")
    d_bins = folder("bin_sharded")
    names = sorted(sd)
    half = {"a": names[: len(names) // 2], "b": names[len(names) // 2 :]}
    for part, keys in half.items():
        torch.save({k: sd[k] for k in keys}, d_bins / f"pytorch_model-{part}.bin")
    weight_map = {k: f"pytorch_model-{part}.bin" for part, keys in half.items() for k in keys}
    (d_bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder_ in (d, ours, d_bin, d_bins):
        assert np.array_equal(zh.our_logits("gpt2", hf.from_pretrained(str(folder_)), b), expected), folder_


class NotATensor:
    """Stands for anything a malicious pickle could smuggle in."""


def test_pickled_objects_are_refused(reference, tmp_path):
    ref, path = reference("gpt2")
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    torch.save({**ref.state_dict(), "payload": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(hf.HFError, match="pickled objects other than tensors.*weights_only=True"):
        hf.from_pretrained(str(tmp_path))


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "xlnet"}))
    with pytest.raises(hf.HFError, match="'xlnet' is not supported; supported: bart, bert, bloom, distilbert, gpt2"):
        hf.from_pretrained(str(tmp_path))


def test_untransferable_model_is_not_exported(tmp_path):
    """PaLM's parallel + multi-query + bias-free LayerNorm block is no transformers architecture."""
    from podformer.model import gpt

    cfg = gpt.GPTConfig.palm_8b(vocab_size=64, d_model=32, num_layers=1, num_heads=4, head_dim=8)
    with pytest.raises(hf.HFError, match="no transformers architecture represents this gpt model"):
        hf.save_pretrained(nnx.eval_shape(lambda: gpt.GPT(cfg, rngs=nnx.Rngs(0))), str(tmp_path))


def test_import_and_export_commands(reference, tmp_path):
    path = str(tmp_path / "hf")
    shutil.copytree(reference("t5_v1_1")[1], path)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # tokenizer files travel with the checkpoint
    workdir, out = str(tmp_path / "work"), str(tmp_path / "out")
    assert hf.main(["import", path, workdir, "--scan_layers=false"]) == 0
    assert hf.main(["import", path, workdir]) == 2  # never over an existing checkpoint
    family, cfg, flat, meta = params.read_workdir(workdir)
    assert family == "t5" and not cfg.scan_layers and meta["params_only"]
    assert hf.main(["export", workdir, out]) == 0
    a, b = hf.read_safetensors(f"{path}/model.safetensors"), hf.read_safetensors(f"{out}/model.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert hf.read_config(out)["model_type"] == "t5"
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


def test_switch_capacity_drops_what_transformers_drops(reference, tmp_path):
    """Switch with 2 tokens per expert per sequence: transformers drops tokens at evaluation too, and the
    imported model (capacity dispatch, one group per sequence) drops the same ones. Right padding only:
    transformers routes padding tokens too, and left padding would let them take room before real tokens
    (podformer's padded positions carry other hidden states)."""
    big, _ = reference("switch_transformers")
    ref = zh.make_reference("switch_transformers", str(tmp_path), expert_capacity=2)
    b = zh.batch("switch_transformers")
    b["attention_mask"][2] = 1
    b["attention_mask"][2, 8:] = 0
    keep = zh.valid("switch_transformers", b)
    expected = zh.reference_logits("switch_transformers", ref, b)
    assert np.abs(expected - zh.reference_logits("switch_transformers", big, b))[keep].max() > 1e-2  # drops
    model = hf.from_pretrained(str(tmp_path))
    assert (model.cfg.expert_capacity, model.cfg.moe_group_size, model.cfg.moe_dispatch) == (2, -1, "capacity")
    got = zh.our_logits("switch_transformers", model, b)
    assert np.abs(got - expected)[keep].max() < 1e-4
