"""Rows of packed sequences: inputs, targets, segment ids, positions and loss weights.

Key schema (one for every family): ``inputs``, ``targets``, ``segment_ids``, ``positions``,
``loss_weights``; encoder-decoder batches use the same names with ``encoder_``/``decoder_`` prefixes.
Segment id 0 is padding; segments are numbered 1, 2, ... within a row and positions restart at 0 in
each segment.
"""

from __future__ import annotations

import numpy as np

from data.tokens import TokenStore


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
