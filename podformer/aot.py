"""Ahead-of-time compilation of the real train step for a TPU topology, on a machine without TPUs.

    python train.py --config=configs/gpt.py:gpt2_small --config.mesh.fsdp=8 --compile_only=v5p:2x2x2
    python train.py --config=configs/gpt.py:gpt2_xl --config.mesh.fsdp=-1 --compile_only=v5p-64

JAX describes a TPU slice (its chips, cores and hosts) through libtpu without any TPU attached
(``jax.experimental.topologies``, as MaxText's train_compile.py does); the train step is lowered and
compiled by the TPU compiler for that slice, and XLA's memory analysis says what one device needs.
libtpu is the optional extra ``pip install -e '.[tpu]'``.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from podformer import mesh as mesh_lib
from podformer import optim, trainer
from podformer.core.errors import UserError
from podformer.data import pipeline
from podformer.losses import LOSSES
from podformer.metrics import log
from podformer.model import attention, kernels


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # as libtpu spells it in a topology: v5p:2x2x2
    dims: int  # 3: a 3-D torus (v4, v5p), 2: a 2-D one (v5e, v6e)
    cores_in_name: bool  # "v5p-64" counts TensorCores (2 per chip); "v5e-16" counts chips
    hbm_gib: float  # HBM per chip (= per JAX device: megacore on v4/v5p), from Google Cloud's TPU docs
    host_type: str  # a one-host accelerator type of this generation, for libtpu's environment
    chip_config: str = ""  # v4 exposes both cores of a chip as one device only with "megacore"


GENERATIONS = {
    "v4": Generation("v4", 3, True, 32, "v4-8", chip_config="megacore"),
    "v5p": Generation("v5p", 3, True, 95, "v5p-8"),
    "v5e": Generation("v5e", 2, False, 16, "v5litepod-4"),
    "v5litepod": Generation("v5e", 2, False, 16, "v5litepod-4"),
    "v6e": Generation("v6e", 2, False, 32, "v6e-4"),
}


def _slice_dims(chips: int, dims: int) -> tuple[int, ...]:
    """The standard slice shape for a chip count: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> ...
    (3-D) or 2x2 -> 2x4 -> 4x4 -> 4x8 ... (2-D), as Cloud TPU's accelerator types define them."""
    if chips < 1 or chips & (chips - 1):
        raise UserError(f"a TPU slice has a power-of-two number of chips, not {chips}")
    shape = [1] * dims
    if chips >= 4:
        shape[:2] = [2, 2]
    elif chips == 2:
        shape[0] = 2
    while int(np.prod(shape)) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)  # grow the last of the smallest axes
        shape[i] *= 2
    return tuple(sorted(shape, key=lambda d: (d == 1, d)))  # 2x2x1, as Cloud TPU spells it


def parse_topology(spec: str) -> tuple[Generation, str]:
    """``v5p:2x2x2`` (a libtpu topology) or ``v5p-64`` (a named slice) -> (generation, libtpu topology)."""
    m = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+)*)|-(\d+))", spec.strip())
    gen = GENERATIONS.get(m.group(1)) if m else None
    if gen is None:
        known = ", ".join(GENERATIONS)
        raise UserError(
            f"--compile_only={spec}: expected GENERATION:AxBxC or GENERATION-N (e.g. v5p:2x2x2, v5p-64) with "
            f"GENERATION one of {known}"
        )
    if m.group(2):
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != gen.dims:
            example = f"{gen.name}:{'x'.join(['2'] * gen.dims)}"
            raise UserError(f"--compile_only={spec}: {gen.name} slices have {gen.dims} dimensions, e.g. {example}")
    else:
        n = int(m.group(3))
        chips = n // 2 if gen.cores_in_name else n
        if gen.cores_in_name and n % 2:
            raise UserError(f"--compile_only={spec}: {gen.name}-N counts TensorCores, two per chip; N must be even")
        shape = _slice_dims(chips, gen.dims)
    return gen, f"{gen.name}:{'x'.join(map(str, shape))}"


def topology_devices(spec: str) -> tuple[Generation, list]:
    try:
        import libtpu  # noqa: F401  (only to give a clear message when it is missing)
    except ImportError:
        raise UserError(
            "--compile_only needs libtpu for the TPU compiler: pip install -e '.[aot]' (no TPU is needed)"
        ) from None
    from jax.experimental import topologies

    gen, name = parse_topology(spec)
    # libtpu reads this host's TPU identity from the environment (else from a GCE metadata server) when
    # it loads. Without TPUs: say "one host, no metadata server", so it neither waits nor warns. The
    # compiled topology comes from `name` alone.
    # It also takes a host-wide lock that any other process with libtpu installed may already hold (JAX
    # probes for TPUs at start-up); compiling touches no TPU, so sharing the library is safe.
    env = {"TPU_ACCELERATOR_TYPE": gen.host_type, "TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost"}
    for key, value in {**env, "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}.items():
        os.environ.setdefault(key, value)
    kwargs = {"chip_config_name": gen.chip_config} if gen.chip_config else {}
    try:
        devices = topologies.get_topology_desc(name, "tpu", **kwargs).devices
    except Exception as e:  # libtpu's own errors are long status strings: keep the first line
        raise UserError(f"--compile_only={spec}: libtpu rejected topology {name}: {str(e).splitlines()[0]}") from None
    return gen, list(devices)


def compile_only(spec: str, cfg, model_cfg, module_cls) -> dict:
    """train.py --compile_only: the run's own model, optimizer, loss and batch layout, compiled for
    topology ``spec``; logs and returns the per-device memory figures."""
    t = cfg.train
    data = pipeline.build(cfg.data, vocab_size=model_cfg.vocab_size, seq_len=t.seq_len)
    return compile_train_step(
        spec,
        cfg=cfg,
        make_model=lambda rngs: module_cls(model_cfg, rngs=rngs),
        tx=optim.make_optimizer(cfg.opt, t.steps),
        schedule=optim.schedule(cfg.opt, t.steps),
        loss=LOSSES[cfg.data.objective],
        example_row=data.train_rows[0],
    )


def compile_train_step(spec: str, *, cfg, make_model, tx, schedule, loss, example_row: dict) -> dict:
    gen, devices = topology_devices(spec)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = tuple(tuple(r) for r in cfg.mesh.rules)
    t = cfg.train
    processes = len({d.process_index for d in devices})
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (t.batch_size // t.grad_accum) % dp or t.batch_size % processes:
        raise UserError(
            f"train.batch_size={t.batch_size} (grad_accum={t.grad_accum}) must be divisible by the data-parallel size "
            f"data*fsdp={dp} and by the {processes} hosts of {spec}"
        )
    graphdef, abstract = trainer.abstract_state(make_model, tx, t.seed)
    shardings = trainer.state_shardings(abstract, mesh, rules, strict=cfg.mesh.strict)
    example = {k: np.zeros((t.batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in example_row.items()}
    log(
        f"compiling the train step for {spec} ({len(devices)} x {devices[0].device_kind}, {processes} hosts); "
        f"mesh {dict(mesh.shape)}"
    )
    # Pallas attention kernels are traced for the TPU, not refused for this host's CPU; matmuls stay XLA
    # dots even where this process opted in to the host BLAS (model/kernels.py).
    with kernels.use("xla"):
        compiled, _ = trainer.compile_train_step(
            graphdef, abstract, shardings, example, loss=loss, train_cfg=t, mesh=mesh, rules=rules,
            schedule=schedule, trace_context=attention.pallas_mode(target="tpu"),
        )  # fmt: skip
    return memory_report(compiled, gen, spec, len(devices))


def memory_report(compiled, gen: Generation, spec: str, num_devices: int) -> dict:
    m = compiled.memory_analysis()
    gib = 2.0**30
    # Donated state aliases its outputs: the peak is arguments + temporaries + non-aliased outputs.
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    report = {
        "topology": spec,
        "devices": num_devices,
        "arguments_gib": m.argument_size_in_bytes / gib,
        "temporaries_gib": m.temp_size_in_bytes / gib,
        "outputs_gib": m.output_size_in_bytes / gib,
        "aliased_gib": m.alias_size_in_bytes / gib,
        "code_gib": m.generated_code_size_in_bytes / gib,
        "peak_gib": (peak + m.generated_code_size_in_bytes) / gib,
        "hbm_gib": gen.hbm_gib,
    }
    report["fits"] = report["peak_gib"] <= gen.hbm_gib
    new_outputs = report["outputs_gib"] - report["aliased_gib"]
    log(
        f"per device: {report['arguments_gib']:.2f} GiB arguments (state + batch), "
        f"{report['temporaries_gib']:.2f} GiB temporaries, {new_outputs:.2f} GiB new outputs, "
        f"{report['code_gib']:.3f} GiB code -> peak {report['peak_gib']:.2f} GiB of {gen.hbm_gib:g} GiB HBM: "
        + ("fits" if report["fits"] else "DOES NOT FIT")
    )
    return report
