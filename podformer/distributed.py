"""Multi-process JAX: explicit settings (config or environment), or JAX's own detection on Cloud TPU VMs
and in SLURM job steps; an initialisation timeout that names the coordinator it could not reach."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading

import jax

from podformer.core.errors import UserError

# Explicit settings from the environment, for launchers that cannot pass --config flags per process.
ENV_COORDINATOR = "PODFORMER_COORDINATOR"
ENV_NUM_PROCESSES = "PODFORMER_NUM_PROCESSES"
ENV_PROCESS_ID = "PODFORMER_PROCESS_ID"
# A process that cannot join the others exits with the code of every other `podformer: error:`.
INIT_FAILED_EXIT_CODE = 2


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str  # single | explicit | tpu | slurm
    coordinator: str = ""
    num_processes: int = 1
    process_id: int = 0
    timeout: int = 300


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text) if text else default
    except ValueError:
        raise UserError(f"{name}={text!r} is not an integer") from None


def _on_cloud_tpu_vm() -> bool:
    # Set by `import jax` when libtpu and TPU chips are present (jax/_src/cloud_tpu_init.py); JAX has no
    # public spelling of it. Without it, num_processes>1 with a coordinator still works on TPU VMs.
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _in_slurm_step() -> bool:
    # The variables JAX's SlurmCluster reads: present inside `srun`, not in the batch script itself.
    keys = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    return all(k in os.environ for k in keys) and _int_env("SLURM_NTASKS", 1) > 1


def settings(dist_cfg) -> Settings:
    """Explicit values win (config, then PODFORMER_* variables); else a TPU VM or a multi-task SLURM step
    lets JAX find everything; else one process. num_processes=1 forces a single process anywhere."""
    coordinator = dist_cfg.coordinator or os.environ.get(ENV_COORDINATOR, "")
    num = dist_cfg.num_processes or _int_env(ENV_NUM_PROCESSES, 0)
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else _int_env(ENV_PROCESS_ID, -1)
    timeout = int(dist_cfg.initialization_timeout)
    if timeout <= 0:
        raise UserError(f"distributed.initialization_timeout={timeout} must be a positive number of seconds")
    if num > 1:
        if not coordinator or ":" not in coordinator:
            raise UserError(
                f"distributed.num_processes={num} needs distributed.coordinator=HOST:PORT (process 0's address; "
                f"or {ENV_COORDINATOR}), got {coordinator!r}"
            )
        if not 0 <= pid < num:
            raise UserError(
                f"distributed.process_id={pid} must be in 0..{num - 1} (or set {ENV_PROCESS_ID}) for {num} processes"
            )
        return Settings("explicit", coordinator, num, pid, timeout)
    if num == 0 and _on_cloud_tpu_vm():
        return Settings("tpu", timeout=timeout)
    if num == 0 and _in_slurm_step():
        return Settings(
            "slurm", num_processes=_int_env("SLURM_NTASKS", 1), process_id=_int_env("SLURM_PROCID", 0), timeout=timeout
        )
    return Settings("single", timeout=timeout)


def _detected(s: Settings) -> Settings:
    """The settings JAX detected (TPU metadata, SLURM variables): it records them before it connects."""
    if s.mode == "explicit":
        return s
    from jax._src import distributed as jax_distributed

    g = jax_distributed.global_state
    return dataclasses.replace(
        s,
        coordinator=getattr(g, "coordinator_address", None) or "(not detected)",
        num_processes=getattr(g, "num_processes", s.num_processes),
        process_id=getattr(g, "process_id", s.process_id),
    )


def _fail_after(s: Settings) -> threading.Timer:
    """jax.distributed.initialize cannot fail fast: its connect retries for about twice the timeout and then
    aborts the process from C++ with a message that does not name the address. This timer does both."""

    def fail():
        d = _detected(s)
        if d.process_id == 0 and d.num_processes > 1:
            what = (
                f"process 0 of {d.num_processes} hosts the JAX coordinator at {d.coordinator}, but not all "
                f"processes connected to it within {d.timeout} s; start every process with the same coordinator"
            )
        else:
            what = (
                f"process {d.process_id} of {d.num_processes} could not reach the JAX coordinator at "
                f"{d.coordinator} within {d.timeout} s; start process 0 (it hosts the coordinator) and check the "
                "address and firewall"
            )
        print(f"podformer: error: {what} (distributed.initialization_timeout)", file=sys.stderr, flush=True)
        os._exit(INIT_FAILED_EXIT_CODE)

    timer = threading.Timer(s.timeout, fail)
    timer.daemon = True
    return timer


def initialize(dist_cfg) -> Settings:
    """Join the other processes, if there are any; a no-op for one process. Call before anything touches
    devices (jax.devices(), any computation)."""
    s = settings(dist_cfg)
    if s.mode == "single":
        return s
    timer = _fail_after(s)
    timer.start()
    try:
        # JAX's own timeout is a backstop only: ours fires first and names the address.
        kwargs = dict(initialization_timeout=s.timeout + 60)
        if s.mode == "explicit":
            # Everything is given: no cluster detection (under SLURM it would also hide all GPUs but one).
            kwargs.update(
                coordinator_address=s.coordinator,
                num_processes=s.num_processes,
                process_id=s.process_id,
                cluster_detection_method="deactivate",
            )
        jax.distributed.initialize(**kwargs)
    finally:
        timer.cancel()
    return s


def check_shared_directory(path) -> None:
    """Every process must see one directory: Orbax's process 0 commits a checkpoint that all processes
    wrote parts of. A local path on a multi-host slice is the classic mistake (use gs:// or a shared
    filesystem); it is caught here, on every process at once, before any work is done."""
    if jax.process_count() == 1:
        return
    import uuid

    import numpy as np
    from jax.experimental import multihost_utils

    nonce = np.frombuffer(uuid.uuid4().hex.encode(), dtype=np.uint8)
    name = bytes(np.asarray(multihost_utils.broadcast_one_to_all(nonce))).decode()
    probe = path / f".shared-test-{name}"
    if jax.process_index() == 0:
        probe.write_text("ok")
    multihost_utils.sync_global_devices(f"podformer shared workdir {name}")
    seen = multihost_utils.process_allgather(np.array(probe.exists(), dtype=np.int32))
    multihost_utils.sync_global_devices(f"podformer shared workdir checked {name}")
    if jax.process_index() == 0:
        probe.unlink()
    blind = [i for i, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
    if blind:
        raise UserError(
            f"workdir {path} is not one directory shared by all {jax.process_count()} processes (process "
            f"{', '.join(map(str, blind))} cannot see a file process 0 wrote); use a gs:// path or a shared filesystem"
        )
