"""The embedded fine-tuning task: which standard-library package a snippet of its source comes from.

Built offline from the embedded corpus (data/corpus.py): every machine has it, so ``python finetune.py``
needs no download. Snippets are windows of consecutive lines; train, validation and test are split by
FILE (a hash of the path), so no test snippet shares a file with a training one and the model has to
learn each package's vocabulary and idiom (event loops, MIME headers, widgets, assertions, DOM nodes,
build commands), not memorise files.
"""

from __future__ import annotations

import hashlib
import os

from podformer.data import corpus

# Top-level packages with enough source for hundreds of snippets each and a distinct idiom. (encodings
# is left out: its codec tables make it trivial; test/ is a mixture of everything.)
CLASSES = ("asyncio", "distutils", "email", "tkinter", "unittest", "xml")
SPLITS = ("train", "validation", "test")


def _split_of(relpath: str) -> str:
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 20
    return "test" if bucket < 4 else "validation" if bucket < 7 else "train"  # 20% / 15% / 65% of files


def _snippets(text: str, lines_per_snippet: int, max_per_file: int) -> list[str]:
    lines = text.splitlines()
    out = []
    for start in range(0, len(lines), lines_per_snippet):
        chunk = "\n".join(lines[start : start + lines_per_snippet])
        if len("".join(chunk.split())) >= 120:  # skip blank runs and stubs
            out.append(chunk)
    if len(out) > max_per_file:  # evenly spaced: large files do not dominate a class
        step = len(out) / max_per_file
        out = [out[int(i * step)] for i in range(max_per_file)]
    return out


def examples(
    split: str, *, classes: tuple[str, ...] = CLASSES, lines_per_snippet: int = 8, max_per_file: int = 24
) -> list[dict]:
    """Classification examples ``{"text", "text_pair": None, "label"}`` (label: index into ``classes``)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    root = corpus.root()
    out = []
    for rel in corpus.files():
        top = rel.split(os.sep)[0]
        if top not in classes or _split_of(rel) != split:
            continue
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        for snippet in _snippets(text, lines_per_snippet, max_per_file):
            out.append({"text": snippet, "text_pair": None, "label": classes.index(top)})
    return out
