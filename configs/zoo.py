"""What the encoder and encoder-decoder configs share: the objective, no sample, the tiny CPU recipe."""

import ml_collections

from configs import common


def encoder_or_seq2seq(name: str, family: str, model, variant: str, objective: str):
    """A run config for a non-causal family: its pretraining objective (data/pipeline.py), no sample at the end."""
    c = common.base(name, family, model)
    c.data.objective = objective
    c.train.sample_prompt = ""
    if family in ("bert", "roberta", "distilbert"):
        distill(c, "runs/bert_tiny" if variant == "tiny" else "")
    if variant == "tiny":
        tiny(c)
    return c


def distill(c, teacher: str) -> None:
    """DistilBERT's distillation (data.objective=distill): the teacher is a podformer workdir or a Hugging
    Face folder of a BERT-family encoder; the loss weights and temperature are the paper's released ones."""
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = teacher
    c.distill.temperature = 2.0
    c.distill.alpha_ce = 5.0  # soft targets
    c.distill.alpha_mlm = 2.0  # masked LM on the labels
    c.distill.alpha_cos = 1.0  # cosine between last hidden states (needs equal widths)
    # Start the student from every (Lt-1)/(Ls-1)-th teacher layer (DistilBERT: 0, 2, 4, 7, 9, 11 of 12),
    # its embeddings and MLM head; needs equal widths. Ignored when init.checkpoint is set.
    c.distill.init_student = True


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
