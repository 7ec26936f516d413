"""SQuAD v1.1 and v2.0 (Rajpurkar et al. 2016, 2018): extractive QA with doc-stride windows over long
contexts, n-best span decoding mapped back to the context through token offsets, no-answer handling for
v2.0, and the official exact match and F1.

python finetune.py --config=configs/finetune/squad.py:bert_base --config.init.checkpoint=~/models/bert-base-uncased
python finetune.py --config=configs/finetune/squad.py:roberta_base --config.task.source=tfds:squad/v2.0 ...
"""

from podformer.configs.finetune import base

VARIANTS = ("tiny", "bert_tiny", "gpt_tiny", "bert_base", "bert_large", "roberta_base", "roberta_large")
VARIANTS += ("distilbert_base", "gpt2_small")


def get_config(variant: str = "tiny"):
    c = base.config("squad", variant, VARIANTS, tiny="bert_tiny", task_type="qa", source="tfds:squad/v1.1")
    c.task.doc_stride = 128  # context tokens consecutive windows share
    c.task.max_query_len = 64  # question tokens kept
    c.task.n_best = 20  # start and end candidates per window
    c.task.max_answer_len = 30  # tokens
    c.task.null_threshold = 0.0  # v2.0: answer "" when the null score beats the best span by more than this
    if variant == "tiny" or variant.endswith("_tiny"):
        base.tiny_recipe(c)
        c.task.doc_stride = 32
        c.task.max_query_len = 32
    else:
        # BERT's SQuAD recipe: 384-token windows with stride 128, batch 32, 2 epochs, lr 3e-5 (v2.0: 5e-5).
        c.train.seq_len = 384
        c.train.epochs = 2.0
        c.train.eval_every = 2000
        c.opt.lr = 3e-5
        c.opt.warmup_steps = 500
    return c
