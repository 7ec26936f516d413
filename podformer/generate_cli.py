"""The generate command: continue prompts with a podformer workdir's model or a Hugging Face folder's.

python -m podformer.generate --model=runs/gpt_tiny --prompt='def '                  # greedy, streamed
python -m podformer.generate --model=runs/gpt_tiny --prompt='def ' --temperature=0.8 --top_p=0.95 --seed=1
python -m podformer.generate --model=hf/t5 --prompts=prompts.txt --num_beams=4 --out=out.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np

from podformer import generate, sampling
from podformer.core.errors import UserError
from podformer.data import hf_tokenizer
from podformer.model import families, gpt, hf, params

USAGE = """usage: python -m podformer.generate --model=WORKDIR_OR_HF_FOLDER (--prompt=TEXT | --prompts=FILE)
    [--max_new_tokens=64] [--step=N|best (a workdir's checkpoint; default: the latest)] [--out=FILE.jsonl]
    greedy (the default) | beam search: --num_beams=N [--length_penalty=1.0]
    | sampling: --sample and/or any of --temperature=T --top_k=K --top_p=P --min_p=P, [--num_samples=N]
      [--seed=0]; --repetition_penalty=R applies to greedy decoding and sampling"""

FLAGS = {
    "model": str,
    "prompt": str,
    "prompts": str,
    "max_new_tokens": int,
    "step": str,
    "out": str,
    "num_beams": int,
    "length_penalty": float,
    "sample": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repetition_penalty": float,
    "num_samples": int,
    "seed": int,
}
SAMPLING = ("temperature", "top_k", "top_p", "min_p")


@dataclasses.dataclass
class Loaded:
    """A model ready to run, its tokenizer, and the ids generation needs."""

    family: str
    model: object
    tokenizer: object
    eos_id: int | None
    pad_id: int
    decoder_start_id: int | None

    def encode(self, text: str) -> list[int]:
        """``text`` framed as the model saw text in training: a Hugging Face tokenizer's own post-processor
        (podformer's exports carry their family's frame in it), or the family's frame (its row's framing in
        model/families.py)."""
        tok = self.tokenizer
        if isinstance(tok, hf_tokenizer.HFTokenizer):
            tok.tok.no_padding()  # a tokenizer.json may pad every text to a fixed length (sentence-transformers')
            return tok.tok.encode(text).ids
        framing = families.get(self.family).framing
        first, last = framing.start, framing.sep
        ids = tok.encode(text)
        ids = ([tok.piece_to_id(first)] if first and tok.piece_to_id(first) is not None else []) + ids
        return ids + ([tok.piece_to_id(last)] if last and tok.piece_to_id(last) is not None else [])


def best_step(workdir: str) -> int:
    """A fine-tuning run's best checkpoint: the step whose saved metric (Orbax's ``<step>/metrics``, the
    task metric finetune.py ranks checkpoints by) is the best value the run recorded in its latest meta."""
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    scored = {}
    for s in steps:
        path = os.path.join(directory, str(s), "metrics", "metrics")
        if os.path.isfile(path):
            with open(path) as f:
                scored[s] = json.load(f)
    meta_path = os.path.join(directory, str(steps[-1]), "meta", "metadata") if steps else ""
    value = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            value = (json.load(f).get("best") or {}).get("value")
    found = [s for s, m in scored.items() if value is not None and value in m.values()]
    if not found:
        raise UserError(
            f"--step=best: {workdir}'s checkpoints carry no best metric (a pretraining run, or none kept); "
            "use its latest checkpoint (no --step) or --step=N"
        )
    return found[-1]


def load(path: str, step: int | str | None = None, **overrides) -> Loaded:
    """A podformer workdir (its latest, ``step`` or 'best' checkpoint and tokenizer/) or a Hugging Face
    folder; ``overrides`` change how the model runs (params.TRAINING_FIELDS: scan_layers, remat, ...)."""
    if params.is_workdir(path):
        if step == "best":
            step = best_step(path)
        elif isinstance(step, str):
            try:
                step = int(step)
            except ValueError:
                raise UserError(f"--step={step!r}: a checkpoint step or 'best'") from None
        try:
            family, cfg, flat, meta = params.read_workdir(path, step)
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
        tok_dir, hf_cfg = os.path.join(path, "tokenizer"), meta.get("hf_config") or {}
        if not os.path.isdir(tok_dir):
            raise UserError(f"{path} has no tokenizer/ (the tokenizer its model was trained with); copy it there")
    elif os.path.isfile(os.path.join(path, "config.json")):
        if step is not None:
            raise UserError(f"--step is for podformer workdirs; {path} is a Hugging Face folder")
        family, cfg, flat, _ = hf.load(path)
        tok_dir, hf_cfg = path, hf.read_config(path)
    else:
        raise UserError(
            f"--model={path}: not a podformer workdir (no checkpoints/ there) nor a Hugging Face folder "
            "(no config.json); point it at a run's workdir (runs/gpt_tiny) or an exported folder"
        )
    tok = hf_tokenizer.load(tok_dir)
    start = hf_cfg.get("decoder_start_token_id")
    row = families.get(family)
    if row.kind != "seq2seq":
        start = None  # a decoder continues its prompt; only an encoder-decoder's decoder has a start id
    elif start is None:
        start = tok.pad_id if row.framing.decoder_start == "pad" else tok.eos_id  # T5: pad; BART: eos
    model = hf.build(family, dataclasses.replace(cfg, **overrides), flat)
    return Loaded(family, model, tok, tok.eos_id, tok.pad_id, start)


def _parse(argv: list[str]) -> dict:
    flags = {}
    for a in argv:
        name, eq, value = a[2:].partition("=") if a.startswith("--") else (a, "", "")
        if name not in FLAGS or not a.startswith("--"):
            raise UserError(f"unknown argument {a!r}\n{USAGE}")
        kind = FLAGS[name]
        if kind is bool:
            if eq and value.lower() not in ("true", "false"):
                raise UserError(f"--{name} takes no value (or true/false), not {value!r}")
            flags[name] = not eq or value.lower() == "true"
            continue
        try:
            flags[name] = kind(value)
        except ValueError:
            raise UserError(f"--{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if "model" not in flags:
        raise UserError(f"--model is required\n{USAGE}")
    if ("prompt" in flags) == ("prompts" in flags):
        raise UserError(f"give one of --prompt=TEXT or --prompts=FILE\n{USAGE}")
    return flags


def _settings(flags: dict) -> tuple[sampling.Sampling | None, int, int]:
    """(sampling or None for greedy/beam search, num_beams, num_samples), checked before any model loads."""
    num_beams, num_samples = flags.get("num_beams", 1), flags.get("num_samples", 1)
    sample = flags.get("sample", False) or any(k in flags for k in SAMPLING) or "seed" in flags
    kw = {k: flags[k] for k in (*SAMPLING, "repetition_penalty") if k in flags}
    s = sampling.Sampling(**kw)  # a bad value (top_p outside (0, 1], ...) fails here
    if sample and num_beams > 1:
        raise UserError("--num_beams is beam search, the sampling flags sample; choose one")
    if num_samples > 1 and not sample:
        raise UserError("--num_samples needs sampling (--sample, or --temperature/--top_k/--top_p/--min_p)")
    if not sample and "repetition_penalty" in flags:
        if num_beams > 1:
            raise UserError("--repetition_penalty is not applied to beam search; drop it or --num_beams")
        # Greedy decoding with a penalty: the penalised argmax, which is top_k=1 sampling.
        return sampling.Sampling(top_k=1, repetition_penalty=s.repetition_penalty), 1, 1
    return (s if sample else None), num_beams, num_samples


def _prompts(flags: dict) -> list[str]:
    if "prompt" in flags:
        return [flags["prompt"]]
    path = flags["prompts"]
    if not os.path.isfile(path):
        raise UserError(f"--prompts={path}: no such file (one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts={path} has no prompts (one per line)")
    return prompts


def _batch(rows: list[list[int]], pad_id: int, left: bool) -> tuple[np.ndarray, np.ndarray]:
    """Prompts padded to one length: on the left for a decoder (generate's contract), right for an encoder."""
    L = max(len(r) for r in rows)
    ids, mask = np.full((len(rows), L), pad_id, np.int32), np.zeros((len(rows), L), np.int32)
    for i, r in enumerate(rows):
        span = slice(L - len(r), L) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def _cut(tokens, eos_id) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


def run(argv: list[str]) -> list[dict]:
    flags = _parse(argv)
    s, num_beams, num_samples = _settings(flags)
    prompts = _prompts(flags)
    T = flags.get("max_new_tokens", 64)
    m = load(flags["model"], flags.get("step"))
    decoder = isinstance(m.model, gpt.GPT)
    rows = [m.encode(p) for p in prompts]
    if any(not r for r in rows):
        raise UserError("a prompt encodes to no tokens; give it some text")
    ids, mask = _batch(rows, m.pad_id, left=decoder)
    key = jax.random.key(flags.get("seed", 0))
    kw = dict(max_new_tokens=T, eos_id=m.eos_id, pad_id=m.pad_id, decoder_start_id=m.decoder_start_id)
    if len(prompts) == 1 and num_beams == 1 and num_samples == 1:
        # One prompt: print the text as it grows. The whole continuation is decoded each time (the
        # tokenizer's spacing depends on what precedes), and held back while it ends in half a character.
        print(prompts[0], end="", flush=True)
        new, shown = [], ""
        for tok in generate.stream(m.model, ids, mask, sampling=s, key=key, **kw):
            new.append(tok)
            text = m.tokenizer.decode(_cut(new, m.eos_id))
            if text.startswith(shown) and not text.endswith("\ufffd"):
                print(text[len(shown) :], end="", flush=True)
                shown = text
        text = m.tokenizer.decode(_cut(new, m.eos_id))
        print(text[len(shown) :] if text.startswith(shown) else "\n" + text)
        outs = [np.asarray(new)]
    else:
        if s is None:
            outs = generate.generate(m.model, ids, mask, num_beams=num_beams,
                                     length_penalty=flags.get("length_penalty", 1.0), **kw)  # fmt: skip
        else:
            outs = generate.sample(m.model, ids, mask, key=key, sampling=s, num_samples=num_samples, **kw)
    results = []
    for r, out in enumerate(outs):
        prompt = prompts[r // num_samples]
        tokens = _cut(out, m.eos_id)
        results.append({"prompt": prompt, "sample": r % num_samples, "completion": m.tokenizer.decode(tokens),
                        "tokens": tokens})  # fmt: skip
        if len(prompts) > 1 or num_beams > 1 or num_samples > 1:
            label = f"[{r // num_samples}{'.' + str(r % num_samples) if num_samples > 1 else ''}]"
            print(f"{label} {prompt}{results[-1]['completion']}")
    if "out" in flags:
        with open(flags["out"], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x) + "\n" for x in results)
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        run(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"podformer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
