"""The grain loader: global batches as sharded ``jax.Array``s, deterministic and resumable by step.

The global batch of step s is rows ``[s*B, (s+1)*B)`` of one shuffled, repeated, random-access row
dataset, whatever the number of hosts; each host reads only the rows its devices hold. The loader's
position is therefore just the step, saved with every checkpoint, and a resume -- on the same or a
different topology -- continues with exactly the next global batch.
"""

from __future__ import annotations

import collections
import sys

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from podformer.core import sharding as msharding
from podformer.core.errors import UserError


class _HostRows(grain.MapDataset):
    """Element j: row ``lo + j % per_host`` of global batch ``j // per_host``."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, lo: int, hi: int):
        super().__init__(parent)
        self.global_batch, self.lo, self.per_host = global_batch, lo, hi - lo

    def __len__(self) -> int:
        return min(len(self._parent) // self.global_batch * self.per_host, sys.maxsize)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, r = divmod(index, self.per_host)
        return self._parent[step * self.global_batch + self.lo + r]


def _stack(rows):
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Loader:
    """Iterates global batches (dicts of sharded jax.Arrays) from step ``start_step`` on."""

    def __init__(
        self,
        rows,
        *,
        global_batch: int,
        mesh: jax.sharding.Mesh,
        rules,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        num_workers: int = 0,
        prefetch: int = 2,
        start_step: int = 0,
    ):
        if len(rows) == 0:
            raise ValueError("the dataset has no rows: the corpus is smaller than one sequence")
        self.mesh, self.rules, self.global_batch = mesh, rules, global_batch
        self.num_workers, self.prefetch = num_workers, prefetch
        ds = grain.MapDataset.source(rows)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        if repeat:
            ds = ds.repeat()  # reseeds the shuffle every epoch
        if hasattr(rows, "transform"):
            # An objective's randomness (data/rows.py), from the row's index in the global stream --
            # epoch included -- so masks change every epoch and are the same on every host and resume.
            ds = ds.random_map(rows.transform, seed=seed)
        self.row_dataset = ds
        self.lo, self.hi = self._host_rows()
        self.batches = _HostRows(ds, global_batch, self.lo, self.hi).batch(
            self.hi - self.lo, drop_remainder=True, batch_fn=_stack
        )
        self.step = start_step
        self._iter = None
        self._buffer: collections.deque = collections.deque()

    def _sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, msharding.batch_spec(self.rules, ndim, self.mesh, self.global_batch))

    def _host_rows(self) -> tuple[int, int]:
        """The contiguous range of global-batch rows held by this process's devices."""
        indices = self._sharding(1).addressable_devices_indices_map((self.global_batch,))
        starts = [idx[0].start or 0 for idx in indices.values()]
        stops = [idx[0].stop if idx[0].stop is not None else self.global_batch for idx in indices.values()]
        lo, hi = min(starts), max(stops)
        return lo, hi

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self

    def _start(self) -> None:
        depth = max(2, self.prefetch)
        ds = self.batches[self.step :].to_iter_dataset(grain.ReadOptions(num_threads=depth, prefetch_buffer_size=depth))
        if self.num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; podformer parses none
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        self._iter = iter(ds)
        self._buffer.clear()

    def _to_global(self, host_batch: dict) -> dict:
        shape = lambda x: (self.global_batch,) + x.shape[1:]  # noqa: E731
        return {
            k: jax.make_array_from_process_local_data(self._sharding(x.ndim), x, shape(x))
            for k, x in host_batch.items()
        }

    def __next__(self) -> dict:
        if self._iter is None:
            self._start()
        # Keep `prefetch` batches already on their way to the devices while the current step runs.
        while len(self._buffer) < max(1, self.prefetch):
            try:
                self._buffer.append(self._to_global(next(self._iter)))
            except StopIteration:
                break
        if not self._buffer:
            raise StopIteration
        self.step += 1
        return self._buffer.popleft()

    def host_batch(self, step: int) -> dict:
        """The numpy rows this host holds of global batch ``step`` (random access, for tests and tools)."""
        return self.batches[step]

    def get_state(self) -> dict:
        return {"step": int(self.step), "global_batch": self.global_batch}

    def set_state(self, state: dict) -> None:
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise UserError(
                f"the checkpoint's data position is for global batch {state['global_batch']}, this run uses "
                f"{self.global_batch}; resume with the same train.batch_size"
            )
        self.step = int(state["step"])
        self._iter = None

    def close(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None
