"""Decoder-only pretraining (causal LM): GPT-2, and the decoder family's presets (model/gpt.py PRESETS:
GPT-3, MT-NLG, GPT-Neo, GPT-J, GPT-NeoX, OPT, BLOOM, LLaMA, PaLM, Gopher, Chinchilla).

python train.py                                   # = --config=configs/gpt.py:tiny, CPU, embedded corpus
python train.py --config=configs/gpt.py:gpt2_small --config.mesh.fsdp=8 --workdir=gs://bucket/gpt2
python train.py --config=configs/gpt.py:moe_tiny                 # 8 experts, top-2, CPU
python train.py --config=configs/gpt.py:llama_7b --config.mesh.fsdp=64 --config.model.remat=full
"""

from podformer.configs import common
from podformer.model.gpt_config import PRESETS, GPTConfig

VARIANTS = ("tiny", "moe_tiny", *PRESETS)

# moe_tiny: the tiny model with 8 experts of half its MLP width in every layer, top-2, so its active
# parameters per token equal tiny's (plus the 8-way routers). Capacity dispatch (factor 1.25): on CPUs XLA
# runs ragged_dot about 2x slower than the capacity einsums; README "Mixture of experts".
MOE_TINY = dict(num_experts=8, experts_per_token=2, expert_d_ff=256, moe_every=1, moe_dispatch="capacity")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise KeyError(f"variants of configs/gpt.py: {', '.join(VARIANTS)}")
    model = GPTConfig.tiny(**MOE_TINY) if variant == "moe_tiny" else getattr(GPTConfig, variant)()
    c = common.base(f"gpt_{variant}", model)
    if variant in ("tiny", "moe_tiny"):
        # Sized to train on 2 CPU cores in about five minutes (1.6M tokens). Unrolled layers: with 4
        # of them XLA's CPU backend runs the unrolled stack ~10% faster than a scan.
        c.model.scan_layers = False
        c.train.steps = 400
        c.train.batch_size = 32
        c.train.seq_len = 128
        c.train.eval_every = 200
        c.opt.lr = 3e-3
        c.opt.warmup_steps = 40
        c.checkpoint.every = 200
    else:
        # GPT-2 / GPT-3 small-scale recipe: 0.5M-token batches of 1024 tokens (a starting point for the larger
        # presets too, whose papers' batch sizes and learning rates are set with --config overrides).
        c.train.steps = 100_000
        c.train.batch_size = 512
        c.train.seq_len = 1024
        c.train.eval_every = 1000
        c.train.log_every = 50
        c.opt.lr = 6e-4
        c.opt.warmup_steps = 2000
        c.checkpoint.every = 2000
        c.model.dtype = "bfloat16"
        c.data.num_workers = 8
    return c
