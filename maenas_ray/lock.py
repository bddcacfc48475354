"""One running sweep per experiment directory: a lock file, ``sweep.lock``, in it.

A sweep (new or resumed) holds ``<experiment>/sweep.lock`` while it runs. The lock names
the host and the process id. Its heartbeat is renewed every :data:`HEARTBEAT_S` seconds:
the file's modification time on a local or NFS directory, a time in the record on object
storage.

A second sweep with the same name and storage path, or a ``--resume`` of a running one,
is refused with the holder's host and pid, so two drivers never interleave their trials
in one directory. A lock left by a driver that died (SIGKILL, a lost node) is taken over:
on the same host when its process is gone, on another host when its heartbeat is older
than :data:`STALE_S` seconds.

Creating the lock is atomic on a local or NFS directory: it is written whole, then
hard-linked into place, which fails if a lock exists. On object storage (s3://, gs://) it
is a write followed by a read-back. That refuses a sweep that starts seconds after
another, but cannot rule out two starting within the same second.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow
import pyarrow.fs

from maenas_ray.storage import Storage

LOCK_FILE = "sweep.lock"
#: How often a running sweep renews its lock's heartbeat.
HEARTBEAT_S = 30.0
#: A lock from another host whose heartbeat is older than this belongs to a dead sweep.
STALE_S = 120.0


class LockError(RuntimeError):
    """The experiment is in use by another running sweep (names its host and pid)."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    if pid <= 0:  # 0 and -1 would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@dataclass
class SweepLock:
    """The lock of one experiment; ``acquire()`` it (or use it as a context manager)."""

    experiment: Storage
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.experiment.join(LOCK_FILE)

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "heartbeat": time.time()}  # fmt: skip

    def holder(self) -> dict[str, Any] | None:
        """The lock's record, or None when there is none (or it is unreadable)."""
        try:
            return json.loads(self.experiment.read_text(LOCK_FILE))
        except (OSError, ValueError, pyarrow.ArrowException):
            return None

    def _live_holder(self) -> dict[str, Any] | None:
        """The holder of the lock if that sweep is still running, else None."""
        held = self.holder()
        if held is None or held.get("token") == self.token:
            return None
        if held.get("host") == socket.gethostname():
            return held if process_alive(int(held.get("pid", -1))) else None
        return held if self.heartbeat_age(held) < STALE_S else None

    def acquire(self) -> SweepLock:
        """Take the lock and start the heartbeat; LockError when a live sweep holds it."""
        for _ in range(3):  # a dead holder's lock is removed, then the creation retried
            held = self._live_holder()
            if held is not None:
                age = self.heartbeat_age(held)
                raise LockError(
                    f"experiment {self.experiment.uri} is in use by a running sweep (host "
                    f"{held.get('host')}, pid {held.get('pid')}, last heartbeat {age:.0f} s "
                    f"ago); wait for it to end, or stop it first (its lock: {self.path})"
                )
            if self._create():
                self._start_heartbeat()
                return self
            if self._live_holder() is None:  # left by a dead sweep (or unreadable)
                with contextlib.suppress(FileNotFoundError):
                    self.experiment.fs.delete_file(self.path)
        raise LockError(f"cannot take the lock {self.path}: another sweep keeps taking it")

    def _create(self) -> bool:
        """Write the lock unless one exists (atomically where the storage allows)."""
        text = json.dumps(self._record())
        if self.experiment.is_local:
            # written whole to a private file, then linked: the lock is never seen half
            # written, and the link fails if a lock exists (atomic, NFS included)
            tmp = self.experiment.join(f".{LOCK_FILE}.{self.token}")
            with open(tmp, "w") as f:
                f.write(text)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            return True
        if self.experiment.exists(LOCK_FILE):
            return False
        self.experiment.write_text(text, LOCK_FILE)
        held = self.holder()
        return held is not None and held.get("token") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            held = self.holder()
            if held is None or held.get("token") != self.token:
                return  # taken over (this sweep was thought dead): leave it alone
            with contextlib.suppress(OSError, pyarrow.ArrowException):  # next beat retries
                self._rewrite()

    def _rewrite(self) -> None:
        """A new heartbeat: a local lock file is touched (its content, which names the
        holder, is never rewritten, so a takeover's lock cannot be overwritten); on object
        storage the record is written again (an object is replaced whole)."""
        if self.experiment.is_local:
            os.utime(self.path)
        else:
            self.experiment.write_text(json.dumps(self._record()), LOCK_FILE)

    def heartbeat_age(self, held: dict[str, Any]) -> float:
        """Seconds since the holder's last heartbeat: the local lock file's modification
        time, else the time in the record."""
        beat = float(held.get("heartbeat", 0.0))
        if self.experiment.is_local:
            with contextlib.suppress(OSError):
                beat = max(beat, os.stat(self.path).st_mtime)
        return time.time() - beat

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sweep-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this sweep's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held = self.holder()
        if held is not None and held.get("token") == self.token:
            # a lock left behind is taken over by the next sweep
            with contextlib.suppress(OSError, pyarrow.ArrowException):
                self.experiment.fs.delete_file(self.path)

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
