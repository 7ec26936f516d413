"""Extractive QA: question + context windows with a doc stride over long contexts, and n-best span decoding
back to the original context text through token offsets (with SQuAD v2's null-score threshold), as the
Hugging Face ``run_qa`` example's preprocessing and ``postprocess_qa_predictions`` do.

A window is ``[CLS] question [SEP] context-piece [SEP] pad...``; ``doc_stride`` is the number of context
tokens consecutive windows share (Hugging Face's meaning), so an answer cut by one window's edge lies
whole inside the next.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from podformer.core.errors import UserError


def _answer_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """The first and last context tokens overlapping characters [start, end), or None if none do."""
    first = next((i for i, (b, e) in enumerate(offsets) if e > start and b < end), None)
    last = next((i for i in reversed(range(len(offsets))) if offsets[i][0] < end and offsets[i][1] > start), None)
    return None if first is None or last is None or last < first else (first, last)


def make_windows(
    examples: Sequence[dict],
    tokenizer,
    *,
    max_len: int,
    doc_stride: int,
    max_query_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
    training: bool,
) -> dict[str, np.ndarray]:
    """Windows of canonical QA examples (data/tasks/sources.py): input_ids, attention_mask,
    token_type_ids (B, max_len) int32 and example_index (B,); training adds start_positions and
    end_positions (0, the CLS token, when the window does not hold the whole first answer or there is
    none); otherwise offsets (B, max_len, 2): each context token's character span in its example's
    context, -1 elsewhere."""
    out = collections.defaultdict(list)
    for index, ex in enumerate(examples):
        question = tokenizer.encode(ex["question"].lstrip())[:max_query_len]  # leading spaces only waste room
        ctx_ids, ctx_offsets = tokenizer.encode_with_offsets(ex["context"])
        head = len(question) + 2  # [CLS] question [SEP]
        room = max_len - head - 1  # context tokens per window, before the final [SEP]
        if room <= doc_stride:
            raise UserError(
                f"QA windows: max_len {max_len} leaves {room} context tokens after a {len(question)}-token question, "
                f"not more than doc_stride {doc_stride}; raise max_len or lower doc_stride / max_query_len"
            )
        answer = None
        answers = ex.get("answers") or {"text": [], "answer_start": []}
        if training and answers["text"]:
            start = answers["answer_start"][0]
            answer = _answer_tokens(ctx_offsets, start, start + len(answers["text"][0]))
        begin = 0
        while True:
            end = min(begin + room, len(ctx_ids))
            ids = [cls_id, *question, sep_id, *ctx_ids[begin:end], sep_id]
            n = len(ids)
            out["input_ids"].append(ids + [pad_id] * (max_len - n))
            out["attention_mask"].append([1] * n + [0] * (max_len - n))
            out["token_type_ids"].append([0] * head + [1] * (n - head) + [0] * (max_len - n))
            out["example_index"].append(index)
            if training:
                inside = answer is not None and begin <= answer[0] and answer[1] < end
                out["start_positions"].append(head + answer[0] - begin if inside else 0)
                out["end_positions"].append(head + answer[1] - begin if inside else 0)
            else:
                offsets = np.full((max_len, 2), -1, np.int32)
                offsets[head : head + end - begin] = np.asarray(ctx_offsets[begin:end], np.int32).reshape(-1, 2)
                out["offsets"].append(offsets)
            if end >= len(ctx_ids):
                break
            begin += room - doc_stride
    return {k: np.asarray(v, np.int32) for k, v in out.items()}


def decode_answers(
    examples: Sequence[dict],
    windows: dict[str, np.ndarray],
    start_logits,
    end_logits,
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """{example id: answer text} from per-window start/end logits (B, max_len): the best-scoring span
    (start + end logit) over all of an example's windows among the top ``n_best`` starts x ends, spans of
    context tokens only, end >= start, at most ``max_answer_len`` tokens. SQuAD v2 (``version_2``): ""
    when the lowest null score (CLS start + end logit) over the windows exceeds the best span's score by
    more than ``null_threshold``. "" also when no valid span exists."""
    start_logits, end_logits = np.asarray(start_logits, np.float32), np.asarray(end_logits, np.float32)
    by_example = collections.defaultdict(list)
    for w, i in enumerate(np.asarray(windows["example_index"])):
        by_example[int(i)].append(w)
    answers = {}
    for i, ex in enumerate(examples):
        best, null = None, None
        for w in by_example[i]:
            s_log, e_log, offsets = start_logits[w], end_logits[w], windows["offsets"][w]
            null = min(null, s_log[0] + e_log[0]) if null is not None else s_log[0] + e_log[0]
            for s in np.argsort(s_log)[::-1][:n_best]:
                if offsets[s, 0] < 0:
                    continue
                for e in np.argsort(e_log)[::-1][:n_best]:
                    if offsets[e, 0] < 0 or e < s or e - s + 1 > max_answer_len:
                        continue
                    span = (int(offsets[s, 0]), int(offsets[e, 1]))
                    if span[1] > span[0] and (best is None or s_log[s] + e_log[e] > best[0]):
                        best = (float(s_log[s] + e_log[e]), *span)
        text = "" if best is None else ex["context"][best[1] : best[2]]
        if version_2 and best is not None and null - best[0] > null_threshold:
            text = ""
        answers[ex["id"]] = text
    return answers
