"""BART (Lewis et al. 2020), pretrained with text infilling (data.objective=bart).

python train.py --config=configs/bart.py:tiny                         # CPU, embedded corpus
python train.py --config=configs/bart.py:large --config.mesh.fsdp=8 --workdir=gs://bucket/bart
"""

from podformer.configs import zoo
from podformer.model.t5_config import BartConfig

VARIANTS = ("tiny", "base", "large")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise KeyError(f"variants of configs/bart.py: {', '.join(VARIANTS)}")
    c = zoo.encoder_or_seq2seq(f"bart_{variant}", getattr(BartConfig, variant)(), variant, zoo.C4)
    if variant != "tiny":
        # BART-large's recipe (RoBERTa's): 8k x 512 tokens, 500k steps, lr 4e-4, b2 0.98, eps 1e-6.
        c.train.steps = 500_000
        c.train.batch_size = 8192
        c.train.seq_len = 512
        c.opt.lr = 4e-4
        c.opt.warmup_steps = 24_000
        c.opt.b2 = 0.98
        c.opt.eps = 1e-6
        c.opt.weight_decay = 0.01
        c.checkpoint.every = 10_000
        c.train.eval_every = 10_000
        c.model.dtype = "bfloat16"
        c.data.num_workers = 8
    return c
