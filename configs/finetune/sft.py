"""Supervised fine-tuning of decoders on prompt/completion JSONL ({"prompt", "completion"} per line), the
loss on the completion only; evaluated by the completion loss and by generating completions (ROUGE, BLEU,
exact match against the references).

python finetune.py --config=configs/finetune/sft.py:gpt2_small --config.init.checkpoint=~/models/gpt2 \
    --config.task.source=data/   # data/train.jsonl, data/validation.jsonl
"""

from podformer.configs.finetune import base

VARIANTS = ("tiny", "gpt_tiny", "gpt2_small", "gpt2_medium")


def get_config(variant: str = "tiny"):
    c = base.config("sft", variant, VARIANTS, tiny="gpt_tiny", task_type="sft", source="sft.jsonl")
    c.task.target_len = 64  # completion tokens generated at evaluation (train.seq_len: prompt + completion)
    c.task.num_beams = 1
    c.task.length_penalty = 1.0
    c.task.max_eval_examples = 200
    if variant == "tiny" or variant.endswith("_tiny"):
        base.tiny_recipe(c)
        c.task.target_len = 16
        c.task.max_eval_examples = 64
    else:
        c.train.seq_len = 512
        c.train.epochs = 3.0
        c.train.eval_every = 1000
        c.opt.lr = 2e-5
        c.model.dropout = 0.0
    return c
