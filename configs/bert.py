"""BERT (Devlin et al. 2019) pretraining: masked LM (--config.data.objective=mlm_nsp adds next-sentence prediction).

python train.py --config=configs/bert.py:tiny                         # CPU, embedded corpus
python train.py --config=configs/bert.py:base_uncased --config.mesh.fsdp=8 --workdir=gs://bucket/bert
"""

from podformer.configs import zoo
from podformer.model.bert_config import BertConfig

VARIANTS = ("tiny", "base_uncased", "large_uncased", "base_cased", "large_cased")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise KeyError(f"variants of configs/bert.py: {', '.join(VARIANTS)}")
    c = zoo.encoder_or_seq2seq(f"bert_{variant}", getattr(BertConfig, variant)(), variant, zoo.WIKIPEDIA)
    if variant != "tiny":
        # BERT's recipe: 256 x 512 tokens, Adam (b2 0.999, eps 1e-6), lr 1e-4, 10k warmup, weight decay 0.01.
        c.train.steps = 1_000_000
        c.train.batch_size = 256
        c.train.seq_len = 512
        c.opt.lr = 1e-4
        c.opt.warmup_steps = 10_000
        c.opt.b2 = 0.999
        c.opt.eps = 1e-6
        c.opt.weight_decay = 0.01
        c.opt.min_lr_ratio = 0.0
        c.checkpoint.every = 10_000
        c.train.eval_every = 10_000
        c.model.dtype = "bfloat16"
        c.data.num_workers = 8
    return c
