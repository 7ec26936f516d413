"""Rows of packed sequences: inputs, targets, segment ids, positions and loss weights.

Key schema (one for every family): ``inputs``, ``targets``, ``segment_ids``, ``positions``,
``loss_weights``; encoder-decoder batches use the same names with ``encoder_``/``decoder_`` prefixes.
Segment id 0 is padding; segments are numbered 1, 2, ... within a row and positions restart at 0 in
each segment.
"""

from __future__ import annotations

import numpy as np

from podformer.data.tokens import TokenStore


def causal_lm_row(store: TokenStore, start: int, seq_len: int) -> dict[str, np.ndarray]:
    """The row of ``seq_len`` next-token predictions starting at token ``start`` of the store.

    Documents are concatenated and cut into rows (GPT-style packing); a document that crosses a row
    boundary continues in the next row with positions restarting at 0. A target in a different
    document than its input (the EOS -> next BOS transition) gets loss weight 0, and attention never
    crosses a document boundary.
    """
    window = np.asarray(store.tokens[start : start + seq_len + 1], dtype=np.int32)
    doc = store.doc_of(np.arange(start, start + seq_len + 1))
    segment = (doc - doc[0] + 1).astype(np.int32)
    seg_start = np.maximum(store.doc_starts[doc[:-1]], start)
    return {
        "inputs": window[:-1],
        "targets": window[1:],
        "segment_ids": segment[:-1],
        "positions": (np.arange(start, start + seq_len) - seg_start).astype(np.int32),
        "loss_weights": (doc[1:] == doc[:-1]).astype(np.float32),
    }


class CausalLMRows:
    """Random-access rows over a token store (every token is a target exactly once per epoch)."""

    def __init__(self, store: TokenStore, seq_len: int):
        self.store, self.seq_len = store, seq_len
        self._len = (store.num_tokens - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        return causal_lm_row(self.store, int(index) * self.seq_len, self.seq_len)


def pack(pieces: list[np.ndarray], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Lay examples end to end in one row of ``length``: tokens, segment ids 1.. (0 = padding) and
    positions restarting at 0 per example. Examples past the end are cut (callers plan rows so that
    they fit; see data/rows.py)."""
    tokens = np.full(length, pad_id, np.int32)
    segment_ids = np.zeros(length, np.int32)
    positions = np.zeros(length, np.int32)
    at = 0
    for k, piece in enumerate(pieces, 1):
        n = min(len(piece), length - at)
        if n <= 0:
            break
        tokens[at : at + n] = piece[:n]
        segment_ids[at : at + n] = k
        positions[at : at + n] = np.arange(n)
        at += n
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


def shift_right(targets: np.ndarray, segment_ids: np.ndarray, start_id: int) -> np.ndarray:
    """Decoder inputs for packed targets: each segment's targets shifted right by one, starting with
    ``start_id`` (teacher forcing never sees the previous example's last token)."""
    shifted = np.concatenate([[start_id], targets[:-1]]).astype(targets.dtype)
    first = np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])
    return np.where(first & (segment_ids > 0), start_id, np.where(segment_ids > 0, shifted, 0)).astype(targets.dtype)
