"""Text-to-text fine-tuning of encoder-decoders (T5, BART): any TFDS dataset with an inputs/targets mapping
(summarization: cnn_dailymail, xsum, samsum, ...) or a JSONL file of {"inputs", "targets"}; evaluated by
generating (greedy or beam search, KV cache) and scoring ROUGE-1/2/L, BLEU and exact match.

python finetune.py --config=configs/finetune/text2text.py:t5_small --config.init.checkpoint=~/models/t5-small
python finetune.py --config=configs/finetune/text2text.py:bart_base --config.task.source=pairs.jsonl ...
"""

from podformer.configs.finetune import base

VARIANTS = ("tiny", "t5_tiny", "bart_tiny", "t5_small", "t5_base", "t5_v1_1_base", "bart_base", "bart_large")


def get_config(variant: str = "tiny"):
    c = base.config("text2text", variant, VARIANTS, tiny="t5_tiny", task_type="text2text", source="tfds:xsum")
    c.task.prefix = "summarize: " if variant.startswith("t5") or variant == "tiny" else ""  # T5's task prefix
    c.task.target_len = 64  # target tokens trained on and generated (train.seq_len: encoder tokens)
    c.task.num_beams = 1  # 1: greedy; > 1: beam search
    c.task.length_penalty = 1.0  # beam search: scores divided by length ** length_penalty
    if variant == "tiny" or variant.endswith("_tiny"):
        base.tiny_recipe(c)
        c.task.target_len = 16
        c.task.max_eval_examples = 64
    else:
        # T5's fine-tuning: constant lr 1e-3 with AdamW's usual stand-in 1e-4; 512 input tokens.
        c.train.seq_len = 512
        c.train.steps = 20_000
        c.train.eval_every = 2000
        c.opt.lr = 1e-4
        c.opt.schedule = "constant"
        c.task.max_eval_examples = 1000
        c.task.num_beams = 4
    return c
