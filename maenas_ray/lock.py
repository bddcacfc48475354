"""One running sweep per experiment directory: a lock file, ``sweep.lock``, in it.

A sweep (new or resumed) holds ``<experiment>/sweep.lock`` while it runs; the file names
the holder's host and process id. A second sweep with the same name and storage path, or
a ``--resume`` of a running one, is refused with that host and pid, so two drivers never
interleave their trials in one directory.

- **Local or NFS directory.** The lock is an exclusive ``flock`` on the file, held by the
  driver process. The operating system (or the NFS server, when the client's lease ends)
  releases it when that process dies, however it dies, so a lock left by a killed sweep
  is free at once. The file itself stays, with the last holder's record.
- **Object storage** (s3://, gs://) has no locks. There the lock is a record written and
  read back, with a heartbeat renewed every :data:`HEARTBEAT_S` seconds. A record whose
  heartbeat is older than :data:`STALE_S` seconds belongs to a dead sweep and is taken
  over. This refuses a sweep that starts seconds after another, but cannot rule out two
  starting within the same second.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import pyarrow
import pyarrow.fs

from maenas_ray.storage import Storage

LOCK_FILE = "sweep.lock"
#: How often a sweep on object storage renews its lock's heartbeat.
HEARTBEAT_S = 30.0
#: A lock on object storage whose heartbeat is older than this belongs to a dead sweep.
STALE_S = 120.0


class LockError(RuntimeError):
    """The experiment is in use by another running sweep (names its host and pid)."""


@dataclass
class SweepLock:
    """The lock of one experiment; ``acquire()`` it (or use it as a context manager)."""

    experiment: Storage
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _fd: int | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.experiment.join(LOCK_FILE)

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "heartbeat": time.time()}  # fmt: skip

    def holder(self) -> dict[str, Any] | None:
        """The lock file's record, or None when there is none (or it is unreadable)."""
        try:
            held = json.loads(self.experiment.read_text(LOCK_FILE))
        except (OSError, ValueError, pyarrow.ArrowException):
            return None
        return held if isinstance(held, dict) else None

    def _refuse(self, held: dict[str, Any] | None, how: str) -> LockError:
        who = f"host {held.get('host')}, pid {held.get('pid')}" if held else "unknown holder"
        return LockError(
            f"experiment {self.experiment.uri} is in use by a running sweep ({who}{how}); "
            f"wait for it to end, or stop it first (its lock: {self.path})"
        )

    def acquire(self) -> SweepLock:
        """Take the lock; LockError when a running sweep holds it."""
        if self.experiment.is_local:
            self._acquire_local()
        else:
            self._acquire_object()
        return self

    # --- local or NFS: flock ----------------------------------------------------------
    def _acquire_local(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live process
            os.close(fd)
            raise self._refuse(self.holder(), "") from None
        text = json.dumps(self._record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        os.fsync(fd)
        self._fd = fd

    # --- object storage: record, read-back, heartbeat ---------------------------------
    def _age(self, held: dict[str, Any]) -> float:
        return time.time() - float(held.get("heartbeat", 0.0))

    def _acquire_object(self) -> None:
        held = self.holder()
        if held is not None and held.get("token") != self.token and self._age(held) < STALE_S:
            raise self._refuse(held, f", last heartbeat {self._age(held):.0f} s ago")
        self.experiment.write_text(json.dumps(self._record()), LOCK_FILE)
        held = self.holder()
        if held is None or held.get("token") != self.token:  # another sweep wrote after us
            raise self._refuse(held, ", started at the same moment")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sweep-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            held = self.holder()
            if held is not None and held.get("token") != self.token:
                message = (
                    f"the lock {self.path} was taken over by host {held.get('host')}, pid "
                    f"{held.get('pid')}: this sweep was thought dead (no heartbeat for "
                    f"{STALE_S:.0f} s); two sweeps now write to {self.experiment.uri}, stop one"
                )
                print(f"error: {message}", file=sys.stderr, flush=True)
                warnings.warn(message, stacklevel=1)
                return
            with contextlib.suppress(OSError, pyarrow.ArrowException):  # next beat retries
                self.experiment.write_text(json.dumps(self._record()), LOCK_FILE)

    def release(self) -> None:
        """Give the lock up (on object storage: remove it, if it is still this sweep's)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            return
        self._stop.set()
        if self._thread is None:
            return  # never taken
        self._thread.join()
        self._thread = None
        held = self.holder()
        if held is not None and held.get("token") == self.token:
            # a lock left behind is taken over by the next sweep once it is stale
            with contextlib.suppress(OSError, pyarrow.ArrowException):
                self.experiment.fs.delete_file(self.path)

    def __enter__(self) -> SweepLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
