"""RoBERTa (Liu et al. 2019) pretraining: dynamic masked LM over full sentences, no NSP.

python train.py --config=configs/roberta.py:tiny                      # CPU, embedded corpus
python train.py --config=configs/roberta.py:base --config.mesh.fsdp=8 --workdir=gs://bucket/roberta
"""

from podformer.configs import zoo
from podformer.model.bert_config import RobertaConfig

VARIANTS = ("tiny", "base", "large")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise KeyError(f"variants of configs/roberta.py: {', '.join(VARIANTS)}")
    model = getattr(RobertaConfig, variant)()
    c = zoo.encoder_or_seq2seq(f"roberta_{variant}", model, variant, zoo.C4)
    if variant != "tiny":
        # RoBERTa's recipe: 8k x 512 tokens, lr 6e-4 (base), 24k warmup, b2 0.98, eps 1e-6, weight decay 0.01.
        c.train.steps = 500_000
        c.train.batch_size = 8192
        c.train.seq_len = 512
        c.opt.lr = 6e-4 if variant == "base" else 4e-4
        c.opt.warmup_steps = 24_000
        c.opt.b2 = 0.98
        c.opt.eps = 1e-6
        c.opt.weight_decay = 0.01
        c.opt.min_lr_ratio = 0.0
        c.checkpoint.every = 10_000
        c.train.eval_every = 10_000
        c.model.dtype = "bfloat16"
        c.data.num_workers = 8
    return c
