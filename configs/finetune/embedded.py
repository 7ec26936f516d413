"""The embedded fine-tuning task (the default of finetune.py): which standard-library package a snippet of
its source comes from (data/tasks/embedded.py), fine-tuning the GPT that `python train.py` leaves in
runs/gpt_tiny (a fresh one when there is none), and scored against the majority-class baseline.

python train.py && python finetune.py          # = --config=configs/finetune/embedded.py:tiny, CPU, ~1 minute
"""

import os

from podformer.configs import gpt
from podformer.configs.finetune import base

VARIANTS = ("tiny",)


def get_config(variant: str = "tiny"):
    c = base.config("embedded", variant, VARIANTS, tiny="gpt_tiny", task_type="classification", source="embedded")
    c.init.checkpoint = os.path.join("runs", gpt.get_config("tiny").name)  # the default train.py run's workdir
    c.init.missing_ok = c.init.checkpoint  # the default run may not exist yet: a fresh model, saying so
    c.task.test_split = "test"
    c.task.predict_split = "test"
    base.tiny_recipe(c)
    c.model.dropout = 0.1
    c.train.steps = 150
    c.train.eval_every = 75
    c.train.log_every = 25
    c.opt.lr = 1e-3
    c.opt.warmup_steps = 15
    return c
