"""What every fine-tuning config shares: the run sections of configs/common.py, the task section, the
fine-tuning recipe (BERT's: AdamW, warmup + linear decay, dropout 0.1), and the model variants."""

import ml_collections

from podformer.configs import common
from podformer.model.bert_config import BertConfig, DistilBertConfig, RobertaConfig
from podformer.model.gpt_config import GPTConfig
from podformer.model.t5_config import BartConfig, T5Config

# variant -> its model (whose config class names the family: model/families.py). With init.checkpoint set, the
# checkpoint's architecture is used and only the model's training fields (dropout, dtype, scan_layers, remat,
# attention_impl) come from here.
MODELS = {
    "tiny": None,  # the task's tiny CPU model (TINY below)
    "bert_tiny": lambda: BertConfig.tiny(scan_layers=False),
    "gpt_tiny": lambda: GPTConfig.tiny(scan_layers=False),
    "t5_tiny": lambda: T5Config.tiny(scan_layers=False),
    "bart_tiny": lambda: BartConfig.tiny(scan_layers=False),
    "bert_base": BertConfig.base_uncased,
    "bert_large": BertConfig.large_uncased,
    "roberta_base": RobertaConfig.base,
    "roberta_large": RobertaConfig.large,
    "distilbert_base": DistilBertConfig.base,
    "gpt2_small": GPTConfig.gpt2_small,
    "gpt2_medium": GPTConfig.gpt2_medium,
    "t5_small": T5Config.small,
    "t5_base": T5Config.base,
    "t5_v1_1_base": T5Config.v1_1_base,
    "bart_base": BartConfig.base,
    "bart_large": BartConfig.large,
}


def config(task: str, variant: str, variants: tuple[str, ...], *, tiny: str, task_type: str, source: str):
    """A fine-tuning run config for ``task`` with model ``variant`` (one of ``variants``; ``tiny`` names
    the tiny variant the task uses)."""
    if variant not in variants:
        raise KeyError(f"variants of configs/finetune/{task}.py: {', '.join(variants)}")
    model = MODELS[tiny if variant == "tiny" else variant]()
    c = common.base(f"finetune_{task}_{variant}", model)
    c.mode = "train"  # train | eval (evaluate a fine-tuned workdir) | predict (write predictions.jsonl)
    if variant != "tiny" and not variant.endswith("_tiny"):
        c.model.dropout = 0.1
        c.model.dtype = "bfloat16"

    t = c.train
    for key in ("sample_prompt", "sample_tokens", "eval_steps"):  # pretraining-only
        del t[key]
    t.steps = 1000  # total optimizer steps, unless train.epochs is set
    t.epochs = 0.0  # > 0: steps = epochs * train examples / batch_size
    t.batch_size = 32
    t.seq_len = 128
    t.eval_every = 500  # evaluate (and checkpoint) every N steps, and at the end; 0: only at the end
    t.eval_batch_size = 64  # global
    t.early_stopping = 0  # stop after N evaluations without a better task.metric; 0: never
    t.log_every = 50

    # BERT's fine-tuning recipe (Devlin et al. 2019, appendix A.3): AdamW, lr in {2,3,5}e-5, warmup, linear decay.
    o = c.opt
    o.lr = 5e-5
    o.schedule = "linear"  # linear (to lr * min_lr_ratio) | constant | cosine, after warmup_steps
    o.warmup_steps = 100
    o.min_lr_ratio = 0.0
    o.b2 = 0.999
    o.weight_decay = 0.01
    # Layer-wise lr decay (ELECTRA): layer i of N trains at lr * layer_decay^(N - i); 1.0 = off.
    o.layer_decay = 1.0

    # The pretraining data section is replaced by what fine-tuning reads: the tokenizer.
    c.data = ml_collections.ConfigDict()
    c.data.tokenizer = ""  # '' = the checkpoint's (HF folder files, an imported workdir's, the pretraining run's)
    c.data.cache_dir = ""  # where a fresh model's tokenizer is trained and cached; '' = $PODFORMER_CACHE
    # A model without a checkpoint gets the tokenizer its family's pretraining config trains (embedded corpus,
    # the family's special tokens): that config's data section.
    c.data.fresh = common.base("fresh", model).data

    c.head = ml_collections.ConfigDict()
    c.head.dropout = -1.0  # dropout before the task head; -1: the model's dropout

    # An init.checkpoint that does not exist is an error, except this one path (a config's own default, e.g.
    # the default train.py run's workdir): then a fresh model is fine-tuned, saying so. A path the user
    # typed never falls back; --config.init.checkpoint= asks for a fresh model.
    c.init.missing_ok = ""
    c.checkpoint.every = 0  # finetune.py checkpoints at every evaluation, keeping the best by task.metric
    c.checkpoint.keep = 1

    c.task = ml_collections.ConfigDict()
    c.task.type = task_type  # classification | regression | qa | tagging | text2text | sft
    # tfds:NAME[/CONFIG][:VERSION] (no TensorFlow needed), or a .jsonl/.csv file or a folder of <split>.jsonl/.csv
    c.task.source = source
    c.task.data_dir = ""  # TFDS data_dir; '' = TFDS's default
    c.task.text_fields = ()  # local files: the fields to read as text[, text_pair]; () = the documented names
    c.task.train_split = "train"
    c.task.validation_split = "validation"  # evaluated during training; the best checkpoint is chosen on it
    c.task.test_split = ""  # also scored at the end of training when set (needs labels)
    c.task.predict_split = "validation"  # mode=predict writes <workdir>/predictions.jsonl for this split
    c.task.metric = ""  # the metric the best checkpoint is kept by; '' = the task's official one
    c.task.max_train_examples = 0  # 0 = all
    c.task.max_eval_examples = 0
    return c


def tiny_recipe(c) -> None:
    """Sized for a CPU: a few hundred steps of short rows at a high learning rate."""
    c.train.steps = 200
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.eval_every = 100
    c.train.log_every = 20
    c.opt.lr = 1e-3
    c.opt.warmup_steps = 20
