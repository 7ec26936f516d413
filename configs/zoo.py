"""What the encoder and encoder-decoder configs share: the objective, no sample, the tiny CPU recipe."""

from configs import common


def encoder_or_seq2seq(name: str, family: str, model, variant: str, objective: str):
    """A run config for a non-causal family: its pretraining objective (data/pipeline.py), no sample at the end."""
    c = common.base(name, family, model)
    c.data.objective = objective
    c.train.sample_prompt = ""
    if variant == "tiny":
        tiny(c)
    return c


def tiny(c) -> None:
    """Sized to train on 2 CPU cores in minutes on the embedded corpus (a 4096-token tokenizer with the
    family's special tokens is trained on first use and cached)."""
    c.model.scan_layers = False  # a few unrolled layers run faster than a scan on XLA's CPU backend
    c.train.steps = 400
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.eval_every = 200
    c.opt.lr = 3e-3
    c.opt.warmup_steps = 40
    c.checkpoint.every = 200
