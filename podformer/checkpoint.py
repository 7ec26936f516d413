"""One Orbax CheckpointManager: model + optimizer state, the data position and the run metadata."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath

from podformer import distributed
from podformer.core.errors import UserError


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


def latest_step(workdir: str) -> int | None:
    """The step of ``workdir``'s latest complete checkpoint (None without one), read without changing it."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.exists():
        return None
    options = ocp.CheckpointManagerOptions(create=False)  # (read_only=True logs two warnings)
    manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "meta"))
    try:
        return manager.latest_step()
    finally:
        manager.close()


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = True, best: tuple[str, str] | None = None):
        """``best=(metric, 'max'|'min')``: keep the ``keep`` best checkpoints by that metric (passed to
        ``save``) instead of the latest ones; saves without metrics (a preemption's) are always kept."""
        self.directory = epath.Path(workdir) / "checkpoints"
        best_kw = {}
        if best is not None:
            best_kw = dict(best_fn=lambda m, name=best[0]: float(m[name]), best_mode=best[1])
        options = ocp.CheckpointManagerOptions(
            **best_kw,
            max_to_keep=keep,
            create=True,
            # A save killed half-way leaves `<step>.orbax-checkpoint-tmp`; it is never listed as a step
            # and is removed here, on the next start.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._remove_unfinished_saves()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def _remove_unfinished_saves(self) -> None:
        """Orbax's own cleanup may run in a background thread; this one is done before anything reads."""
        if jax.process_index() != 0 or not self.directory.exists():
            return
        for path in self.directory.iterdir():
            if ".orbax-checkpoint-tmp" in path.name:
                path.rmtree() if path.is_dir() else path.unlink()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False, metrics=None) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)
        )
        return self.manager.save(step, args=args, force=force, metrics=metrics)

    def best_step(self) -> int | None:
        """The best step by the ``best`` metric (None without metrics)."""
        return self.manager.best_step()

    def restore(self, step: int, abstract_state) -> tuple:
        """(state, data_state, meta) of ``step``, the state placed into ``abstract_state``'s shardings."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data, restored.meta

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
