"""GLUE (Wang et al. 2019): the nine tasks from TFDS, with their official metrics (CoLA: Matthews
correlation; STS-B, a regression: Pearson and Spearman; MRPC and QQP: F1 and accuracy; the rest: accuracy).

python finetune.py --config=configs/finetune/glue.py:bert_base --config.init.checkpoint=~/models/bert-base-uncased
python finetune.py --config=configs/finetune/glue.py:roberta_base --config.task.source=tfds:glue/stsb \
    --config.task.type=regression --config.init.checkpoint=runs/roberta_hf --workdir=runs/stsb
python finetune.py --config=configs/finetune/glue.py:tiny --config.task.source=my_data.jsonl   # local file
"""

from podformer.configs.finetune import base

VARIANTS = ("tiny", "bert_tiny", "gpt_tiny", "t5_tiny", "bart_tiny", "bert_base", "bert_large", "roberta_base")
VARIANTS += ("roberta_large", "distilbert_base", "gpt2_small", "gpt2_medium", "t5_small", "t5_base", "bart_base")
VARIANTS += ("bart_large",)


def get_config(variant: str = "tiny"):
    c = base.config("glue", variant, VARIANTS, tiny="bert_tiny", task_type="classification", source="tfds:glue/sst2")
    if variant == "tiny" or variant.endswith("_tiny"):
        base.tiny_recipe(c)
    else:
        # BERT's GLUE recipe: batch 32, 3 epochs, lr 2e-5 (RoBERTa: 1e-5..3e-5), warmup ~6% of the steps.
        c.train.epochs = 3.0
        c.train.eval_every = 1000
        c.opt.lr = 2e-5
        c.opt.warmup_steps = 300
    return c
