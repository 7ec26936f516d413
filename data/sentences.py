"""Sentence splitting that keeps every character: the sentences of a text concatenate back to it."""

from __future__ import annotations

import re

# A sentence ends at a newline, or after . ! ? (and closing quotes/brackets) followed by whitespace and
# something that can start a sentence. The whitespace stays with the sentence before it, so the
# sentences of a text concatenate back to the text exactly (code and prose alike).
_BOUNDARY = re.compile(r"\n|(?<=[.!?])[\"')\]]*[ \t]+(?=[\"'(\[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (whitespace-only pieces merged into the sentence before them)."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        piece = text[start:end]
        if out and not piece.strip():
            out[-1] += piece
        elif piece:
            out.append(piece)
        start = end
    tail = text[start:]
    if tail:
        if out and not tail.strip():
            out[-1] += tail
        else:
            out.append(tail)
    return out
