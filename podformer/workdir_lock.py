"""One writer per workdir: a lease file naming the holder (host, pid) with a heartbeat.

On a local or NFS disk the lease is also an flock held for the whole run, so the kernel ends it when the
process dies, however it dies: a second run is refused at once and a stale lease (its process gone) is
taken over at once. Object stores (gs://) have no locks: there the lease is only the file and its
heartbeat, a run refuses a lease refreshed within STALE_SECONDS, takes over an older one, and two runs
started within the same second can both win. Only process 0 of a multi-process run holds the lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time

import jax
from etils import epath

from podformer import preemption
from podformer.core.errors import UserError
from podformer.metrics import log

NAME = "podformer.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0  # gs:// only: a lease not refreshed for this long belongs to a dead run


@contextlib.contextmanager
def hold(workdir: str):
    """The workdir's lease for the duration of the block (a signal during start-up releases it too)."""
    lock = WorkdirLock(workdir).acquire()
    preemption.at_startup_exit(lock.release)
    try:
        yield lock
    finally:
        lock.release()
        preemption.forget_startup_exit(lock.release)


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = epath.Path(workdir) / NAME
        self.remote = "://" in str(workdir)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _record(self) -> str:
        return json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started, "heartbeat": time.time()}
        )

    def acquire(self) -> WorkdirLock:
        if jax.process_index() != 0:
            return self
        previous = self._acquire_remote() if self.remote else self._acquire_local()
        if previous is not None:
            log(f"podformer: took over the stale lease of {_holder(previous)} on {self.path}")
        self._thread = threading.Thread(target=self._beat, name="podformer-lease", daemon=True)
        self._thread.start()
        return self

    def _acquire_local(self) -> dict | None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UserError(_refusal(self.path, _read(self.path))) from None
            # The holder may have removed the file between our open and our flock: then ours is an orphan.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(self.path)
        self._fd = fd
        self._write()
        return previous if previous and previous.get("pid") else None

    def _acquire_remote(self) -> dict | None:
        previous = _read(self.path)
        if previous and time.time() - previous.get("heartbeat", 0) < STALE_SECONDS:
            raise UserError(_refusal(self.path, previous))
        self._write()
        return previous

    def _write(self) -> None:
        if self._fd is not None:
            data = self._record().encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
        else:
            self.path.write_text(self._record())

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._write()
            except OSError:  # a transient storage error: the next beat tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if jax.process_index() != 0:
            return
        try:
            if self._fd is not None:
                os.unlink(self.path)  # before unlocking, so no one locks the old file's inode afterwards
                os.close(self._fd)
                self._fd = None
            elif self.remote and (_read(self.path) or {}).get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass


def _read(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return None


def _holder(rec: dict) -> str:
    beat = time.time() - rec.get("heartbeat", 0)
    return f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')} (last heartbeat {beat:.0f} s ago)"


def _refusal(path: epath.Path, rec: dict | None) -> str:
    who = _holder(rec) if rec and rec.get("pid") else "another process"
    return (
        f"workdir {path.parent} is in use by {who}, which holds {path}; wait for it to finish or stop it, "
        "or pass another --workdir"
    )
