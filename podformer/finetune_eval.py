"""Evaluation for finetune.py: run a split through the model once (head outputs, or generation for
text-to-text and SFT) and score it (podformer/finetune_tasks.py)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from podformer import finetune_tasks as tasks
from podformer import finetuning, generate, trainer
from podformer.data.loader import Loader
from podformer.data.tasks import features


class Evaluator:
    def __init__(self, task, tok, lay, graphdef, state_shardings, mesh, rules, *, seq_len: int, batch_size: int):
        self.task, self.tok, self.lay = task, tok, lay
        self.graphdef, self.shardings, self.mesh, self.rules = graphdef, state_shardings, mesh, rules
        self.seq_len, self.batch_size = seq_len, batch_size
        self._fns: dict = {}

    def _batches(self, rows: dict[str, np.ndarray]):
        """Every row exactly once, in order, in global batches (the last one padded at weight 0)."""
        model_rows = {k: v for k, v in rows.items() if k not in tasks.MODEL_KEYS_DROPPED}
        padded, n = features.pad_rows(model_rows, self.batch_size)
        loader = Loader(
            features.Rows(padded),
            global_batch=self.batch_size,
            mesh=self.mesh,
            rules=self.rules,
            shuffle=False,
            repeat=False,
            prefetch=1,
        )
        try:
            for _ in range(len(loader)):
                yield next(loader)
        finally:
            loader.close()

    def _fn(self, kind: str, batch: dict):
        key = (kind, tuple(sorted(batch)))
        if key not in self._fns:
            shard = {k: v.sharding for k, v in batch.items()}
            if kind == "predict":
                self._fns[key] = finetuning.jit_predict(
                    self.graphdef, self.shardings, shard, self.mesh, finetuning.HEAD_OF[self.task.type]
                )
            else:
                loss = finetuning.TASK_LOSSES[self.task.type]
                self._fns[key] = trainer.jit_eval_step(self.graphdef, self.shardings, shard, loss=loss)
        return self._fns[key]

    def predict(self, state, rows: dict[str, np.ndarray]) -> np.ndarray:
        """The head's outputs for every row (class logits, span logits, per-token class ids)."""
        n = len(next(iter(rows.values())))
        outs = []
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            for batch in self._batches(rows):
                out = self._fn("predict", batch)(state, batch)
                outs.append(np.asarray(out.addressable_data(0)))  # replicated: every process has all of it
        return np.concatenate(outs)[:n]

    def loss(self, state, rows: dict[str, np.ndarray]) -> float:
        sums, denom = 0.0, 0.0
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            for batch in self._batches(rows):
                out = jax.device_get(self._fn("loss", batch)(state, batch))
                sums += float(out["sums"]["loss"])
                denom += float(next(iter(out["denominators"].values())))
        return sums / max(denom, 1.0)

    def generate(self, state, examples: list[dict], rows: dict[str, np.ndarray]) -> list[str]:
        """Greedy or beam-search outputs (task.num_beams) with a KV cache (podformer/generate.py)."""
        c, lay = self.task.cfg, self.lay
        if self.task.type == "text2text":
            ids, mask = rows["encoder_inputs"], rows["encoder_segment_ids"]
            start = lay.decoder_start
        else:
            ids, mask = features.prompts([ex["prompt"] for ex in examples], self.tok, lay, self.seq_len - c.target_len)
            start = None
        texts = []
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            model = nnx.merge(self.graphdef, state).model.backbone
            for i in range(0, len(ids), self.batch_size):
                out = generate.generate(
                    model,
                    ids[i : i + self.batch_size],
                    mask[i : i + self.batch_size],
                    max_new_tokens=c.target_len,
                    eos_id=lay.eos,
                    pad_id=lay.pad,
                    num_beams=c.num_beams,
                    length_penalty=c.length_penalty,
                    decoder_start_id=start,
                )
                texts += tasks.decode(self.tok, out, lay.eos, lay.pad)
        return texts

    def evaluate(self, state, examples: list[dict]) -> tuple[dict, list[dict]]:
        """(metrics, prediction records) of ``examples``."""
        rows = tasks.rows(self.task, examples, self.tok, self.lay, self.seq_len, training=False)
        if finetuning.HEAD_OF[self.task.type] != "lm":
            return tasks.score(self.task, examples, self.predict(state, rows), rows, self.tok)
        loss = self.loss(state, rows)
        metrics, records = tasks.score(self.task, examples, self.generate(state, examples, rows), rows, self.tok)
        return {"loss": loss, **metrics}, records
