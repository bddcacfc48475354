"""One running sweep per experiment directory (maenas_ray/lock.py)."""

import json
import multiprocessing
import os
import socket
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


def _write_lock(exp, **record):
    base = {"host": socket.gethostname(), "pid": 1, "token": "other", "heartbeat": time.time()}
    exp.write_text(json.dumps({**base, **record}), LOCK_FILE)


def test_a_held_lock_refuses_a_second_sweep_and_is_gone_after_release(tmp_path):
    exp = _experiment(tmp_path)
    first = SweepLock(exp).acquire()
    held = json.loads(exp.read_text(LOCK_FILE))
    assert held["host"] == socket.gethostname() and held["token"] == first.token
    refused = rf"is in use by a running sweep \(host .*, pid {held['pid']}, last heartbeat"
    with pytest.raises(LockError, match=refused):
        SweepLock(exp).acquire()
    first.release()
    assert not exp.exists(LOCK_FILE)
    with SweepLock(exp):  # free again
        assert exp.exists(LOCK_FILE)
    assert not exp.exists(LOCK_FILE)


def test_the_lock_of_a_dead_sweep_is_taken_over(tmp_path, dead_pid):
    exp = _experiment(tmp_path)
    _write_lock(exp, pid=dead_pid)  # this host, process gone (e.g. SIGKILL)
    with SweepLock(exp) as taken:
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == taken.token
    exp.write_text("{not json", LOCK_FILE)  # unreadable: no live sweep stands behind it
    with SweepLock(exp) as taken:
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == taken.token


def test_another_hosts_lock_counts_while_its_heartbeat_is_fresh(tmp_path):
    exp = _experiment(tmp_path)
    old = time.time() - lk.STALE_S - 1
    _write_lock(exp, host="node-7", pid=4242, heartbeat=old)
    os.utime(exp.join(LOCK_FILE), (old, time.time() - 5))  # touched 5 s ago: alive
    with pytest.raises(LockError, match=r"host node-7, pid 4242, last heartbeat 5 s ago"):
        SweepLock(exp).acquire()
    os.utime(exp.join(LOCK_FILE), (old, old))  # silent for longer than STALE_S: dead
    with SweepLock(exp) as taken:
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == taken.token


def test_the_heartbeat_touches_the_lock_and_release_leaves_a_foreign_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(lk, "HEARTBEAT_S", 0.05)
    exp = _experiment(tmp_path)
    lock = SweepLock(exp).acquire()
    path = exp.join(LOCK_FILE)
    os.utime(path, (0, 0))
    deadline = time.monotonic() + 10
    while os.stat(path).st_mtime == 0:
        assert time.monotonic() < deadline, "no heartbeat within 10 s"
        time.sleep(0.05)
    assert lock.heartbeat_age(json.loads(exp.read_text(LOCK_FILE))) < 5
    # taken over meanwhile (this sweep was thought dead): the heartbeat stops, and the
    # release does not delete the new holder's lock
    _write_lock(exp, token="newer")
    time.sleep(0.3)
    lock.release()
    assert json.loads(exp.read_text(LOCK_FILE))["token"] == "newer"
    assert [p.name for p in (tmp_path / "exp").iterdir()] == [LOCK_FILE]  # no temp files


def test_object_storage_locks_by_write_and_read_back(tmp_path):
    # a SubTreeFileSystem is not a LocalFileSystem: the object-storage path is taken
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    exp = Storage("s3://bucket/sweeps", fs, "sweeps").experiment("exp")
    fs.create_dir(exp.path, recursive=True)
    assert not exp.is_local
    with SweepLock(exp) as held:
        assert json.loads(exp.read_text(LOCK_FILE))["token"] == held.token
        with pytest.raises(LockError, match=r"s3://bucket/sweeps/exp is in use"):
            SweepLock(exp).acquire()
    assert not exp.exists(LOCK_FILE)


def _race(path: str, barrier, results) -> None:
    exp = resolve_storage(path).experiment("exp")
    barrier.wait()
    try:
        SweepLock(exp).acquire()  # kept until this process exits
        results.put("won")
        time.sleep(1.0)
    except LockError:
        results.put("refused")


def test_of_sweeps_starting_at_the_same_moment_exactly_one_gets_the_lock(tmp_path):
    _experiment(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcome = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcome == ["refused", "refused", "refused", "won"]
