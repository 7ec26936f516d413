"""CoNLL-2003 named-entity recognition (Tjong Kim Sang and De Meulder 2003): token classification with the
first sub-token of each word labelled, scored by entity-level F1 (seqeval).

python finetune.py --config=configs/finetune/conll.py:bert_base --config.init.checkpoint=~/models/bert-base-cased
python finetune.py --config=configs/finetune/conll.py:tiny --config.task.source=ner.jsonl   # tokens/tags JSONL
"""

from podformer.configs.finetune import base

VARIANTS = ("tiny", "bert_tiny", "gpt_tiny", "bert_base", "bert_large", "roberta_base", "roberta_large")
VARIANTS += ("distilbert_base", "gpt2_small")


def get_config(variant: str = "tiny"):
    c = base.config("conll", variant, VARIANTS, tiny="bert_tiny", task_type="tagging", source="tfds:conll2003")
    if variant == "tiny" or variant.endswith("_tiny"):
        base.tiny_recipe(c)
    else:
        # BERT's NER fine-tuning: 3-5 epochs, lr 5e-5, batch 32.
        c.train.epochs = 4.0
        c.train.eval_every = 1000
        c.opt.lr = 5e-5
    return c
