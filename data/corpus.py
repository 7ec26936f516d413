"""The embedded corpus: the Python standard library's own sources, present on every machine.

Code and English docstrings, found through ``sysconfig`` (site-packages excluded), split into train and
validation by a hash of each file's path, so the split is the same on every machine and every run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig

NAME = "pystdlib"


def root() -> str:
    return sysconfig.get_paths()["stdlib"]


def files() -> list[str]:
    """Relative paths of every ``.py`` file of the standard library, sorted."""
    base = root()
    out = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), base))
    return sorted(out)


def split_of(relpath: str, validation_percent: int) -> str:
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100
    return "validation" if bucket < validation_percent else "train"


def documents(split: str, validation_percent: int = 3) -> list[str]:
    """The texts of one split. Files that are not UTF-8 (a few test fixtures are, on purpose) are skipped."""
    base = root()
    texts = []
    for rel in files():
        if split_of(rel, validation_percent) != split:
            continue
        try:
            with open(os.path.join(base, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            texts.append(text)
    return texts


def fingerprint(validation_percent: int = 3) -> str:
    """Changes whenever the corpus or its split would: Python version, file list and sizes."""
    base = root()
    h = hashlib.sha256(f"{sys.version_info[:3]}|{validation_percent}".encode())
    for rel in files():
        h.update(f"{rel}:{os.path.getsize(os.path.join(base, rel))};".encode())
    return h.hexdigest()[:16]
