"""One Orbax CheckpointManager: model + optimizer state, the data position and the run metadata, each
committed step verified by a manifest of checksums."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from podformer import distributed
from podformer.core.errors import UserError
from podformer.metrics import log

# Every file of a committed step with its size and CRC-32, written by process 0 once the data is on disk and
# before Orbax commits the step (async saves: Orbax's post-finalization callback runs just before the rename
# of `<step>.orbax-checkpoint-tmp` to `<step>`, or before `commit_success.txt` on gs://). A step without a
# manifest is incomplete; a file missing, short or with another checksum makes it damaged.
MANIFEST = "podformer_manifest.json"
# Steps at or below the number in this file were saved before podformer wrote manifests: they are used
# unverified. Every later step must have a manifest.
SINCE = "manifests_since"
DAMAGED = "damaged_checkpoints"
# Orbax rewrites its step metadata (commit time) when it commits, after the manifest: only its presence
# is checked.
REWRITTEN = ("_CHECKPOINT_METADATA",)  # <workdir>/damaged_checkpoints/<step>: moved aside, never deleted


class SaveFailed(UserError):
    """An asynchronous save failed in the background (disk full, permission, quota)."""


def check_workdir(workdir: str) -> epath.Path:
    """Create ``workdir`` if needed and prove it is writable, before any expensive work starts."""
    path = epath.Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"workdir {workdir!r} is not writable ({e.strerror or e}); pass --workdir=<a writable directory>"
        ) from None
    distributed.check_shared_directory(path)
    return path


def _cause(e: BaseException) -> str:
    """An I/O error in a few words: TensorStore's long messages reduced to the OS error and its file."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.errno:
        return f"{e.strerror or os.strerror(e.errno)}" + (f" ({e.filename})" if e.filename else "")
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
        path = re.findall(r'(?:Failed writing|Error writing|Error reading|writing|reading):? "([^"]+)"', text)
        return os.strerror(int(code.group(1))) + (f" writing {path[-1]}" if path else "")
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 240 else first[:240] + "..."


class _QuietOrbax(logging.Filter):
    """Orbax logs a background save's failure as several tracebacks, and asyncio the same error again for
    each of its write tasks; podformer reports it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "orbax" not in record.getMessage()
        return "orbax" not in record.pathname


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_QuietOrbax())


def _quiet_closed_loops() -> None:
    """After a failed save, TensorStore's outstanding writes complete into the event loop Orbax already
    closed, and each reports an unraisable "Event loop is closed" traceback, from the moment the save fails:
    they say nothing the one-line error does not. Installed once, for the process."""
    previous = sys.unraisablehook
    if getattr(previous, "podformer", False):
        return

    def hook(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.podformer = True
    sys.unraisablehook = hook


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
    out = {}
    stack = [step_dir]
    while stack:
        d = stack.pop()
        for p in d.iterdir():
            if p.is_dir():
                stack.append(p)
            elif p.name != MANIFEST:
                out[str(p.relative_to(step_dir))] = p
    return out


def _crc(path: epath.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(step_dir: epath.Path) -> None:
    files = {
        name: None if name in REWRITTEN else [p.stat().length, _crc(p)] for name, p in sorted(_files(step_dir).items())
    }
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=0))
    tmp.replace(step_dir / MANIFEST)


def _legacy_limit(directory: epath.Path) -> int:
    """Steps up to this one may lack a manifest: all of them in a workdir no Checkpointer has opened since
    manifests exist (it writes the file on opening)."""
    path = directory / SINCE
    return int(path.read_text()) if path.exists() else 2**62


_INTACT: set[str] = set()  # step directories this process verified (the start-up check and the resume read once)


def verify(step_dir: epath.Path, *, legacy_limit: int) -> str | None:
    """Why ``step_dir`` is not an intact checkpoint (None if it is)."""
    if str(step_dir) in _INTACT:
        return None
    reason = _verify(step_dir, legacy_limit=legacy_limit)
    if reason is None:
        _INTACT.add(str(step_dir))
    return reason


def _verify(step_dir: epath.Path, *, legacy_limit: int) -> str | None:
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return None if int(step_dir.name) <= legacy_limit else f"no {MANIFEST} (its save never completed)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{MANIFEST} is unreadable"
    for name, expected in files.items():
        p = step_dir / name
        if not p.exists():
            return f"{name} is missing"
        if expected is None:
            continue
        size, crc = expected
        if p.stat().length != size:
            return f"{name} has {p.stat().length} bytes, {size} were written"
        if _crc(p) != crc:
            return f"{name} does not match its checksum"
    return None


def _steps(directory: epath.Path) -> list[int]:
    if not directory.exists():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)


def latest_step(workdir: str) -> int | None:
    """The step of ``workdir``'s newest intact checkpoint (None without one), read without changing it."""
    directory = epath.Path(workdir) / "checkpoints"
    limit = _legacy_limit(directory)
    for step in _steps(directory):
        if verify(directory / str(step), legacy_limit=limit) is None:
            return step
    return None


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = True, best: tuple[str, str] | None = None):
        """``best=(metric, 'max'|'min')``: keep the ``keep`` best checkpoints by that metric (passed to
        ``save``) instead of the latest ones; saves without metrics (a preemption's) are always kept.

        Opening it verifies the newest step: a damaged or incomplete one is moved to
        <workdir>/damaged_checkpoints/ (one line says so) and the next newest is verified, until one is
        intact (``latest_step()``); with none intact it is a UserError."""
        _quiet_closed_loops()
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / "checkpoints"
        self.async_save = async_save
        self._saving: int | None = None  # the step whose save runs in the background
        self._last_good: int | None = None
        best_kw = {}
        if best is not None:
            best_kw = dict(best_fn=lambda m, name=best[0]: float(m[name]), best_mode=best[1])
        async_kw = {}
        if async_save:
            async_kw = dict(async_options=ocp.AsyncOptions(post_finalization_callback=self._write_pending_manifest))
        options = ocp.CheckpointManagerOptions(
            **best_kw,
            **async_kw,
            max_to_keep=keep,
            create=True,
            # A save killed half-way leaves `<step>.orbax-checkpoint-tmp`; it is never listed as a step
            # and is removed here, on the next start.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._remove_unfinished_saves()
        self._verified = self._select_intact()
        self._last_good = self._verified
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def _remove_unfinished_saves(self) -> None:
        """Orbax's own cleanup may run in a background thread; this one is done before anything reads."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for path in self.directory.iterdir():
            if ".orbax-checkpoint-tmp" in path.name:
                path.rmtree() if path.is_dir() else path.unlink()

    def _select_intact(self) -> int | None:
        """Process 0 verifies the newest steps, moving damaged ones aside; every process gets its answer."""
        chosen = -1
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            steps = _steps(self.directory)
            if not (self.directory / SINCE).exists():
                # Steps saved before manifests existed stay usable; every later one carries a manifest.
                (self.directory / SINCE).write_text(str(steps[0] if steps else -1))
            limit = _legacy_limit(self.directory)
            moved = []
            for step in steps:
                reason = verify(self.directory / str(step), legacy_limit=limit)
                if reason is None:
                    chosen = step
                    break
                target = self._move_aside(step)
                moved.append(str(step))
                later = [s for s in steps if s < step]
                then = f"falling back to step {later[0]}" if later else "no earlier step left"
                log(f"podformer: checkpoint step {step} is damaged ({reason}); moved it to {target}; {then}")
            if moved and chosen < 0:
                chosen = -2
        if jax.process_count() > 1:  # every process raises, or none
            from jax.experimental import multihost_utils

            chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        if chosen == -2:
            raise UserError(
                f"no intact checkpoint in {self.directory} (the damaged steps are in {self.workdir / DAMAGED}); "
                "rerun the same command to train from scratch in this workdir, or use a new --workdir"
            )
        return None if chosen < 0 else chosen

    def _move_aside(self, step: int) -> epath.Path:
        aside = self.workdir / DAMAGED
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / str(step)
        n = 1
        while target.exists():
            target, n = aside / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(target)
        return target

    def _write_pending_manifest(self) -> None:
        """Orbax's post-finalization callback (process 0, background thread): the step's data is complete."""
        step = self._saving
        tmp = self.directory / f"{step}.orbax-checkpoint-tmp"
        write_manifest(tmp if tmp.exists() else self.directory / str(step))

    def latest_step(self) -> int | None:
        """The newest intact step (verified when this Checkpointer was opened) or the newest saved since."""
        return self._verified

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def last_good(self) -> str:
        """Where the newest committed checkpoint is, for an error message (a save in flight is waited for)."""
        try:
            self.manager.wait_until_finished()
            self.check()
        except Exception:  # noqa: BLE001, S110 (then the one before it is the last good one)
            pass
        return self._describe_last_good()

    def _describe_last_good(self) -> str:
        if self._last_good is None:
            return f"no checkpoint was committed in {self.directory}"
        return f"the last good checkpoint is step {self._last_good} in {self.directory}"

    def check(self) -> None:
        """Raise SaveFailed if the background save has failed (a host-side check: no device sync)."""
        thread = self.manager._finalize_thread.get()  # orbax keeps the background save's exception here
        if thread is not None and not thread.is_alive():
            if thread.exception is not None:
                self._fail(thread.exception)
            if self._saving is not None:
                self._last_good = self._saving

    def _fail(self, e: BaseException):
        cause = _cause(e)
        self.manager._finalize_thread.set(None)  # reported once; close() must not raise it again
        raise SaveFailed(
            f"saving step {self._saving} to {self.directory} failed: {cause}; {self._describe_last_good()} "
            "(intact): free space or fix the permissions, then rerun the same command to resume from it"
        ) from None

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False, metrics=None) -> bool:
        self.check()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (the background save's error, whatever its type)
            self._fail(e)
        previous, self._saving = self._saving, step
        try:
            saved = self.manager.save(step, args=args, force=force, metrics=metrics)
            if saved and not self.async_save:
                # (a synchronous save is committed by Orbax before its manifest exists: a kill in between
                # leaves a step without one, which the next start treats as incomplete)
                if jax.process_index() == 0:
                    write_manifest(self.directory / str(step))
                self._last_good = step
        except (OSError, ValueError) as e:
            self._fail(e)
        if not saved:
            self._saving = previous
        else:
            self._verified = step
        return saved

    def best_step(self) -> int | None:
        """The best step by the ``best`` metric (None without metrics)."""
        return self.manager.best_step()

    def restore(self, step: int, abstract_state) -> tuple:
        """(state, data_state, meta) of ``step``, the state placed into ``abstract_state``'s shardings:
        all three or none."""
        self._check_intact(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self.manager.restore(step, args=args)
        except (ValueError, OSError, KeyError) as e:
            raise UserError(f"could not restore step {step} from {self.directory}: {_cause(e)}") from None
        return restored.state, restored.data, restored.meta

    def _check_intact(self, step: int) -> None:
        if step == self._verified or jax.process_index() != 0:
            return
        reason = verify(self.directory / str(step), legacy_limit=_legacy_limit(self.directory))
        if reason is not None:
            raise UserError(
                f"checkpoint step {step} in {self.directory} is damaged ({reason}); move it out of "
                f"{self.directory} to use another step"
            )

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        self.check()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def on_error(self):
        """Around the loop: an error (a non-finite step, a failed save) first lets a save in flight end,
        so the last good checkpoint is committed or cleanly uncommitted, never half-written."""
        try:
            yield
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """On an error path: wait for a save in flight (it stays valid or stays uncommitted), never raise."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001, S110 (the error being reported matters more than this one)
            pass
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001, S110
            pass


# What a resumed run must share with the run that saved the checkpoint: the model's shape (its training-only
# fields such as dropout, dtype or remat may change), the batch and what the rows are. A difference is one
# error naming each key, before any data is built.
RUNTIME_MODEL_FIELDS = ("dropout", "attention_dropout", "dtype", "remat", "attention_impl", "host_blas")
SAME_RUN = (
    "train.batch_size",
    "train.seq_len",
    "data.objective",
    "data.source",
    "data.files",
    "data.tfds_name",
    "data.mixture",
    "data.tokenizer",
    "data.tokenizer_type",
)


def config_diff(saved: dict, run: dict) -> list[str]:
    """'key: saved -> run' for each compared key that differs (keys the saved config lacks are skipped)."""

    def get(d, key):
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return _MISSING
            d = d[part]
        return d

    keys = [f"model.{k}" for k in saved.get("model", {}) if k not in RUNTIME_MODEL_FIELDS]
    out = []
    for key in [*keys, *SAME_RUN]:
        a, b = get(saved, key), get(run, key)
        if a is _MISSING or b is _MISSING:
            continue
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


_MISSING = object()


def check_same_run(workdir: str, step: int, meta: dict, run_config: dict) -> None:
    diff = config_diff(meta.get("config", {}), run_config)
    if diff:
        raise UserError(
            f"{workdir} holds a run with another config (checkpoint step {step} vs this run: {'; '.join(diff)}); "
            "resume with the checkpoint's values or pass a new --workdir"
        )
