"""One running sweep per experiment directory (maenas_ray/lock.py)."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.fs
import pytest

from maenas_ray import lock as lk
from maenas_ray.lock import LOCK_FILE, LockError, SweepLock
from maenas_ray.storage import Storage, resolve_storage


def _experiment(tmp_path):
    exp = resolve_storage(str(tmp_path)).experiment("exp")
    exp.fs.create_dir(exp.path, recursive=True)
    return exp


def test_a_held_lock_refuses_a_second_sweep_until_released(tmp_path):
    exp = _experiment(tmp_path)
    first = SweepLock(exp).acquire()
    held = json.loads(exp.read_text(LOCK_FILE))
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    with pytest.raises(
        LockError, match=rf"is in use by a running sweep \(host .*, pid {os.getpid()}\)"
    ):
        SweepLock(exp).acquire()
    first.release()
    with SweepLock(exp) as second:  # free again
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == second.token


_HOLD = """
import sys, time
from maenas_ray.lock import SweepLock
from maenas_ray.storage import resolve_storage
SweepLock(resolve_storage(sys.argv[1]).experiment("exp")).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_killed_sweeps_lock_is_free_at_once(tmp_path):
    exp = _experiment(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"pid {holder.pid}\)"):
            SweepLock(exp).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup of any kind
        holder.wait()
    assert json.loads(exp.read_text(LOCK_FILE))["pid"] == holder.pid  # its record stays
    with SweepLock(exp) as taken:  # but the lock went with the process
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == taken.token


def _race(path: str, barrier, results) -> None:
    exp = resolve_storage(path).experiment("exp")
    barrier.wait()
    try:
        SweepLock(exp).acquire()  # kept until this process exits
        results.put("won")
        time.sleep(1.0)
    except LockError:
        results.put("refused")


@pytest.mark.parametrize("leftover", [None, "record of a dead sweep", "garbage"])
def test_of_sweeps_starting_at_the_same_moment_exactly_one_gets_the_lock(tmp_path, leftover):
    exp = _experiment(tmp_path)
    if leftover == "record of a dead sweep":
        exp.write_text(
            json.dumps({"host": socket.gethostname(), "pid": 1, "token": "x"}), LOCK_FILE
        )
    elif leftover == "garbage":
        exp.write_text("{not json", LOCK_FILE)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcome = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcome == ["refused", "refused", "refused", "won"]


def _object_experiment(tmp_path):
    # a SubTreeFileSystem is not a LocalFileSystem: the object-storage path is taken
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    exp = Storage("s3://bucket/sweeps", fs, "sweeps").experiment("exp")
    fs.create_dir(exp.path, recursive=True)
    assert not exp.is_local
    return exp


def _write_record(exp, **record):
    base = {"host": "node-7", "pid": 4242, "token": "other", "heartbeat": time.time()}
    exp.write_text(json.dumps({**base, **record}), LOCK_FILE)


def test_object_storage_locks_by_record_and_heartbeat(tmp_path):
    exp = _object_experiment(tmp_path)
    with SweepLock(exp) as held:
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == held.token
        with pytest.raises(LockError, match=r"s3://bucket/sweeps/exp is in use .*last heartbeat"):
            SweepLock(exp).acquire()
    assert not exp.exists(LOCK_FILE)  # removed on release
    _write_record(exp, heartbeat=time.time() - 5)  # another sweep, alive
    with pytest.raises(LockError, match=r"host node-7, pid 4242, last heartbeat 5 s ago"):
        SweepLock(exp).acquire()
    _write_record(exp, heartbeat=time.time() - lk.STALE_S - 1)  # silent too long: dead
    with SweepLock(exp) as taken:
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == taken.token


def test_the_heartbeat_renews_the_record_and_says_so_when_taken_over(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    exp = _object_experiment(tmp_path)
    lock = SweepLock(exp).acquire()
    first = json.loads(exp.read_text(LOCK_FILE))["heartbeat"]
    deadline = time.monotonic() + 10
    # a local file is not replaced atomically as an object is: holder() is None mid-write
    while (lock.holder() or {"heartbeat": first})["heartbeat"] == first:
        assert time.monotonic() < deadline, "no heartbeat within 10 s"
        time.sleep(0.05)
    with pytest.warns(UserWarning, match=r"was taken over by host node-7, pid 4242"):
        # this sweep was thought dead. A beat that read its own record just before this
        # write puts it back (object storage has no compare-and-swap), so write again
        # until the heartbeat has read the new holder's record and stopped
        while lock._thread.is_alive():
            assert time.monotonic() < deadline + 10, "the heartbeat never saw the new holder"
            _write_record(exp, token="newer")
            lock._thread.join(timeout=0.2)
    assert "two sweeps now write to s3://bucket/sweeps/exp" in capfd.readouterr().err
    lock.release()  # does not delete the new holder's lock
    assert json.loads(exp.read_text(LOCK_FILE))["token"] == "newer"
