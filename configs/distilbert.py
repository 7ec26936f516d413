"""DistilBERT (Sanh et al. 2019): a 6-layer student distilled from a BERT teacher (soft targets at
temperature 2, masked LM, cosine on hidden states; the student starts from every other teacher layer).

python train.py --config=configs/bert.py:tiny                         # the teacher: runs/bert_tiny
python train.py --config=configs/distilbert.py:tiny                   # distils it, CPU, embedded corpus
python train.py --config=configs/distilbert.py:base --config.distill.teacher=PATH   # a BERT-base workdir/HF folder
(--config.data.objective=mlm trains the architecture without a teacher.)
"""

from podformer.configs import zoo
from podformer.model.bert_config import DistilBertConfig

VARIANTS = ("tiny", "base")


def get_config(variant: str = "tiny"):
    if variant not in VARIANTS:
        raise KeyError(f"variants of configs/distilbert.py: {', '.join(VARIANTS)}")
    model = getattr(DistilBertConfig, variant)()
    c = zoo.encoder_or_seq2seq(f"distilbert_{variant}", model, variant, zoo.WIKIPEDIA)  # BERT's data
    if variant != "tiny":
        # DistilBERT's recipe: 4k-sequence batches of 512 tokens, lr 5e-4, Adam eps 1e-6.
        c.train.steps = 100_000
        c.train.batch_size = 4096
        c.train.seq_len = 512
        c.opt.lr = 5e-4
        c.opt.warmup_steps = 5_000
        c.opt.b2 = 0.98
        c.opt.eps = 1e-6
        c.opt.weight_decay = 0.01
        c.checkpoint.every = 5_000
        c.train.eval_every = 5_000
        c.model.dtype = "bfloat16"
        c.data.num_workers = 8
    return c
