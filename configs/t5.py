"""T5 (Raffel et al. 2020), T5 v1.1 and mT5, pretrained with span corruption.

python train.py --config=configs/t5.py:tiny                           # CPU, embedded corpus
python train.py --config=configs/t5.py:moe_tiny                       # Switch-style MoE, span corruption
python train.py --config=configs/t5.py:v1_1_base --config.mesh.fsdp=8 --workdir=gs://bucket/t5
"""

from podformer.configs import zoo
from podformer.model.t5_config import T5_PRESETS, T5Config

VARIANTS = ("tiny", "moe_tiny", *T5_PRESETS)

# moe_tiny: Switch Transformer's layout on the tiny T5 -- every other feed-forward layer of both stacks a
# top-1 mixture of 8 experts (no renormalisation), capacity-based dispatch with factor 1.25.
MOE_TINY = dict(num_experts=8, experts_per_token=1, moe_every=2, router_renormalize=False, moe_dispatch="capacity")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise KeyError(f"variants of configs/t5.py: {', '.join(VARIANTS)}")
    model = T5Config.tiny(**MOE_TINY) if variant == "moe_tiny" else getattr(T5Config, variant)()
    c = zoo.encoder_or_seq2seq(f"t5_{variant}", model, "tiny" if variant == "moe_tiny" else variant, zoo.C4)
    if variant not in ("tiny", "moe_tiny"):
        # T5's pretraining shape: 128 sequences of 512 tokens (2^16 tokens per batch), 2^19 steps. T5 used
        # Adafactor with an inverse-square-root schedule; podformer's AdamW at 1e-3 is the usual stand-in.
        c.train.steps = 524_288
        c.train.batch_size = 128
        c.train.seq_len = 512
        c.opt.lr = 1e-3
        c.opt.warmup_steps = 10_000
        c.opt.weight_decay = 0.0
        c.checkpoint.every = 10_000
        c.train.eval_every = 10_000
        c.model.dtype = "bfloat16"
        c.data.num_workers = 8
    return c
