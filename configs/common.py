"""The sections every run config has, and the logical-axis -> mesh-axis rules table."""

import dataclasses

import ml_collections

from podformer.model import families

# Logical axis -> mesh axes. Parameters are sharded over fsdp on their model dimension and over tensor
# on heads / mlp / vocab, experts' weights over expert on their expert dimension; activations are sharded
# over data, fsdp and expert on the batch dimension (the dense layers use the expert devices as data parallel),
# and at block boundaries over tensor on the model dimension too (MaxText's activation_embed): a tensor group
# then holds one copy of the saved residual stream, not `tensor` copies. XLA gathers it for the norms and
# matmuls of the next block and reduce-scatters the block's output (Megatron's sequence parallelism, on embed).
# With pipeline stages (mesh.stage > 1) model/pipeline.py's staged_rules adds the stage axis: 'layers' ->
# stage, and the batch over stage too outside the stack.
RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    # Weights' model dimension over fsdp, and over expert too: for a mixture of experts' dense weights the
    # expert axis is one more data-parallel axis (MaxText's embed rule has it too); an expert kernel's is
    # expert_embed, since its expert dimension is over expert.
    ("embed", ("fsdp", "expert")),
    ("expert_embed", "fsdp"),
    ("activation_embed", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("expert", "expert"),
    ("expert_group", ("data", "fsdp")),  # MoE routing groups beside the expert axis (model/moe.py)
)


def base(name: str, model) -> ml_collections.ConfigDict:
    """A complete run config around the family dataclass instance ``model`` (its family's row, in
    model/families.py, names the family and the pretraining objective)."""
    family = families.of(model)
    c = ml_collections.ConfigDict()
    c.name = name  # default workdir: ./runs/<name>

    c.model = ml_collections.ConfigDict({"family": family.name, **dataclasses.asdict(model)})

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 32  # global, over all hosts and devices
    c.train.seq_len = 128
    c.train.grad_accum = 1  # micro-batches per step; batch_size must be divisible by it
    c.train.log_every = 10
    c.train.eval_every = 250  # 0: only at the end
    c.train.eval_steps = 8  # validation batches per evaluation (0: no evaluation)
    c.train.eval_at_start = False  # also evaluate the model before the first step
    c.train.seed = 0
    # A step whose loss or gradient norm is not finite: 'stop' ends the run with one line naming the last
    # good checkpoint (no non-finite state is ever saved); 'skip' leaves that step's update out and counts it
    # (metrics: skipped_steps).
    c.train.on_nonfinite = "stop"
    c.train.sample_prompt = "def"  # the run ends with a greedy continuation of this ('' to skip)
    c.train.sample_tokens = 48

    c.opt = ml_collections.ConfigDict()
    c.opt.lr = 3e-4  # peak learning rate
    c.opt.warmup_steps = 100
    c.opt.decay_steps = 0  # cosine decay length; 0: train.steps
    c.opt.min_lr_ratio = 0.1  # final lr = lr * min_lr_ratio
    c.opt.b1 = 0.9
    c.opt.b2 = 0.95
    c.opt.eps = 1e-8
    c.opt.weight_decay = 0.1  # not applied to biases, norms or (1-D) scales
    c.opt.clip_norm = 1.0  # global gradient norm; 0 disables
    # AdamW's first moment in bfloat16 ('bfloat16') halves its memory; '' keeps the parameters' float32.
    # The second moment stays float32: its square-gradient scale needs the mantissa (optax's mu_dtype).
    c.opt.mu_dtype = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "embedded"  # the Python standard library's own sources
    c.data.objective = family.objective
    c.data.tokenizer = ""  # a SentencePiece .model; '' trains one on the corpus (cached)
    c.data.tokenizer_type = "bpe"  # for a trained tokenizer: bpe | unigram
    c.data.cache_dir = ""  # tokenizers and token caches; '' = $PODFORMER_CACHE or ~/.cache/podformer
    c.data.validation_percent = 3  # embedded corpus: share of files held out (by a hash of the path)
    c.data.num_workers = 0  # grain worker processes (0: read in the main process with threads)
    c.data.build_workers = 0  # processes that tokenize a new corpus into its store (0: one per core)
    c.data.prefetch = 2  # batches prepared ahead, on host and on device
    # Sources and objectives (data/pipeline.py). source: embedded | tfds | files | mixture.
    c.data.tfds_name = ""  # source=tfds: NAME[/CONFIG][:VERSION], e.g. c4/en:3.1.0, wikipedia/20230601.en
    c.data.tfds_data_dir = ""  # '' = TFDS's default; gs://bucket/tensorflow_datasets on TPU VMs
    c.data.train_split = "train"  # TFDS splits; slices work, e.g. train[:99%] / train[99%:]
    c.data.validation_split = "validation"
    c.data.files = ""  # source=files: a folder or glob of .txt / .jsonl / .parquet (built once into ArrayRecord)
    c.data.mixture = ""  # source=mixture: 'SOURCE=WEIGHT, ...' with SOURCE embedded | tfds:NAME | files:GLOB
    c.data.text_field = "text"  # the TFDS feature / .jsonl and .parquet field holding the text
    c.data.doc_split = "file"  # .txt documents: file (one per file) | blank_line (BERT's format)
    c.data.mlm_probability = 0.15  # masked LM objectives: share of tokens selected (80/10/10)
    c.data.max_predictions = 0  # BERT's max_predictions_per_seq; 0 = no cap
    c.data.whole_word_masking = False
    c.data.dynamic_masking = True  # new masks every epoch (RoBERTa); False: fixed per row (BERT)
    c.data.short_seq_prob = 0.1  # NSP/SOP: share of pairs with a shorter random target length
    c.data.noise_density = 0.15  # T5 span corruption
    c.data.mean_noise_span = 3.0
    c.data.bart_mask_ratio = 0.3  # BART text infilling: share of words masked, Poisson(3) spans

    # The schedule of a run with mesh.stage > 1 (model/pipeline.py): each (grad_accum) batch is split into
    # pipeline.microbatches; repeats > 1 is the circular schedule, each stage holding `repeats` layer groups.
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.microbatches = 0  # 0: 2 x mesh.stage
    c.pipeline.repeats = 1  # 1: GPipe; R: circular, bubble (S-1)/(R*M+S-1)

    c.init = ml_collections.ConfigDict()
    # Parameters to start from when the workdir has no checkpoint yet: a podformer workdir (its latest
    # checkpoint, e.g. one `python -m podformer.model.hf import` wrote) or a Hugging Face model folder. '' = none.
    c.init.checkpoint = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: the devices that fsdp x tensor leave
    c.mesh.fsdp = 1
    c.mesh.expert = 1  # expert parallelism: mixture-of-experts weights split over their expert dimension
    c.mesh.tensor = 1
    # Pipeline stages (README "Pipeline stages"): the scanned layer stack split into mesh.stage equal parts,
    # the outermost axis of a slice; data/fsdp/expert/tensor then count devices per stage.
    c.mesh.stage = 1
    c.mesh.devices = 0  # 0: every device; N: only the first N (single process)
    # Multislice: stage, data, fsdp and tensor are sizes within one slice (ICI); the stage, data and fsdp
    # axes span dcn_stage, dcn_data and dcn_fsdp slices across the data-centre network (DCN), outermost.
    # PaLM: dcn_data=2; pipeline stages on separate GPU nodes: dcn_stage=nodes. dcn_data=-1: the TPU slices
    # the others leave (1 on GPUs and CPUs, where a process is a slice if asked for).
    c.mesh.dcn_stage = 1
    c.mesh.dcn_data = -1
    c.mesh.dcn_fsdp = 1
    c.mesh.rules = RULES
    # A parameter dimension that its mesh axes do not divide (25 heads under tensor=2) is replicated over them,
    # and the start-of-run "sharding:" line says so; true makes it an error instead (by-design replication,
    # such as one key/value head under multi-query attention, stays allowed).
    c.mesh.strict = False

    c.metrics = ml_collections.ConfigDict()
    # Peak FLOP/s per device for MFU; 0: the known figure for TPUs and H100/H200 (bf16), or a measured
    # float32 matmul rate on other hardware (CPUs included).
    c.metrics.peak_tflops = 0.0

    c.profile = ml_collections.ConfigDict()
    # Train steps to trace with the JAX profiler into <workdir>/profile: '10-12', '5', '10-12,50-51'; '' = none.
    c.profile.steps = ""

    # Multi-process runs (README "From a CPU to a TPU pod"): on Cloud TPU VMs and in SLURM steps leave these
    # unset and JAX finds everything; elsewhere give all three (or PODFORMER_COORDINATOR/_NUM_PROCESSES/
    # _PROCESS_ID). num_processes=1 forces a single process.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""  # host:port of process 0; '' = from the environment, if any
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialization_timeout = 300  # seconds to wait for all processes, then fail naming the coordinator
    return c
