"""What the encoder and encoder-decoder configs share: the objective, no sample, the tiny CPU recipe."""

import ml_collections

from podformer.configs import common
from podformer.model import families


def encoder_or_seq2seq(name: str, model, variant: str, paper: tuple[str, str, str]):
    """A run config for a non-causal family: its pretraining objective (data/pipeline.py), no sample at the
    end; ``paper``: the (TFDS name, train split, validation split) closest to what its paper pretrained on
    (read through tfds.data_source; a TPU VM points data.tfds_data_dir at gs://.../tensorflow_datasets)."""
    c = common.base(name, model)
    c.train.sample_prompt = ""
    if families.of(model).kind == "encoder":  # any encoder can be a distilled student
        distill(c, "runs/bert_tiny" if variant == "tiny" else "")
    if variant == "tiny":
        tiny(c)
    else:
        c.data.source = "tfds"
        c.data.tfds_name, c.data.train_split, c.data.validation_split = paper
    return c


# What each paper pretrained on, as the TFDS datasets closest to it. BERT's BooksCorpus and the RoBERTa/BART
# 160 GB mix (books, CC-News, OpenWebText, Stories) are not in TFDS: add them as local files through
# data.source=mixture, e.g. 'tfds:wikipedia/20230601.en=0.7, files:/data/books/*.txt=0.3'.
WIKIPEDIA = ("wikipedia/20230601.en", "train[:99%]", "train[99%:]")  # BERT's (+ BooksCorpus in the paper)
C4 = ("c4/en:3.1.0", "train", "validation")  # T5's own; web text, as most of RoBERTa's and BART's 160 GB


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
