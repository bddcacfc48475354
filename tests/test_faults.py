"""Faults a cluster inflicts on a sweep's driver, injected the real way: the driver's process
group SIGKILLed at a watched moment, and Ctrl-C (SIGINT). After ``--resume`` every trial
ends exactly once in Ray Tune and in the Optuna study, and each epoch is computed once."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from test_sweep import _results, _study, _sweep_command, _trial_dirs, write_config

from maenas_ray.engines import load_search_state


def _start(config: Path, store: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        _sweep_command(config, store, "--name", "f", *extra), stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True, cwd=config.parent,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen, log: Path, ready, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, f"the sweep ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {limit:.0f} s"
        time.sleep(0.05)


def _resume(config: Path, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        _sweep_command(config, store, "--resume", "--name", "f"), capture_output=True,
        text=True, cwd=config.parent, timeout=600,
    )  # fmt: skip


def _every_trial_once(experiment: Path, trials: int, epochs: int) -> None:
    """Each trial finished once in Tune and once (COMPLETE) in the study, every search epoch
    computed once and reported once, and no study trial left running."""
    results = _results(experiment)
    assert len(results) == trials and not results.errors
    assert all(r.metrics["epoch"] == epochs for r in results)
    study = _study(experiment, experiment.name)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == trials, [(t.number, t.state) for t in study.trials]
    running = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert running == []
    orphans = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert all("orphan" in t.user_attrs for t in orphans)  # asked for, never a Tune trial
    values = sorted(t.value for t in complete)
    assert values == sorted(r.metrics["eval_loss"] for r in results)
    for trial in _trial_dirs(experiment):
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1)), trial
        computed = []
        for path in glob.glob(str(trial / "search" / "checkpoint_*" / "search_state.pt")):
            with contextlib.suppress(ValueError):  # one cut off by the kill is no result
                computed.append(load_search_state(path)["epoch"])
        assert sorted(computed) == list(range(1, epochs + 1)), (trial, computed)


def _drop_last_tell(journal: Path) -> None:
    """The study's last COMPLETE record lost, as if the driver died before writing it."""
    lines = journal.read_text().splitlines(keepends=True)
    told = [i for i, line in enumerate(lines) if '"state":1' in line.replace(" ", "")]
    if told:
        del lines[told[-1]]
        journal.write_text("".join(lines))


@pytest.mark.parametrize("moment", ["study-complete", "tune-state", "mid-report"])
def test_a_driver_killed_between_study_and_tune_state_resumes(tmp_path, moment):
    """The three windows of a driver's death: just after the study recorded a trial
    COMPLETE (before Tune saved its own state); just after Tune saved its state with a
    finished trial, with the study's record of it lost; and between two reports."""
    config = write_config(
        tmp_path, search={"epochs": 2}, tune={"num_samples": 3, "checkpoints_to_keep": 10}
    )
    store, log = tmp_path / "store", tmp_path / "first.log"
    experiment = store / "f"
    journal = experiment / "optuna.journal"

    def study_complete() -> bool:
        return journal.is_file() and '"state":1' in journal.read_text().replace(" ", "")

    def tune_state() -> bool:
        states = glob.glob(str(experiment / "experiment_state-*.json"))
        return any("TERMINATED" in Path(p).read_text(errors="replace") for p in states)

    def mid_report() -> bool:  # a trial's first epoch stored, its second not yet
        first = glob.glob(str(experiment / "trial_*" / "search" / "checkpoint_epoch_00001"))
        second = glob.glob(str(experiment / "trial_*" / "search" / "checkpoint_epoch_00002"))
        return bool(first) and not second

    watched = {"study-complete": study_complete, "tune-state": tune_state,
               "mid-report": mid_report}[moment]  # fmt: skip
    proc = _start(config, store, log)
    _wait_for(proc, log, watched, moment)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait(timeout=60)
    if moment == "tune-state":
        _drop_last_tell(journal)
    resumed = _resume(config, store)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "UpdateFinishedTrialError" not in resumed.stdout + resumed.stderr
    _every_trial_once(experiment, trials=3, epochs=2)
    # and the leaderboard reads every trial as done
    assert "unfinished" not in resumed.stdout.split("rank  trial", 1)[1]


def test_ctrl_c_stops_the_sweep_with_130_and_says_how_to_resume(tmp_path):
    config = write_config(
        tmp_path, search={"epochs": 3}, tune={"num_samples": 2, "checkpoints_to_keep": 10}
    )
    store, log = tmp_path / "store", tmp_path / "first.log"
    proc = _start(config, store, log)
    # the first epoch stored (Tune's result.json reaches the storage only when Tune syncs
    # its state, which can be after these short trials have ended)
    _wait_for(proc, log, lambda: glob.glob(str(store / "f" / "trial_*" / "search"
                                               / "checkpoint_epoch_00001")),
              "first epoch")  # fmt: skip
    proc.send_signal(signal.SIGINT)  # Ctrl-C in the driver's terminal
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    out = log.read_text()
    assert "the sweep was interrupted:" in out
    assert f"python -m maenas_ray.sweep --resume --name f --storage-path {store}" in out
    assert "partial leaderboard" in out and "Tuner.restore(" not in out
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    resumed = _resume(config, store)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _every_trial_once(store / "f", trials=2, epochs=3)


def test_an_epoch_whose_report_was_lost_is_reported_once_after_the_restart(
    tmp_path, capsys, monkeypatch
):
    """The trial process dies after epoch 2's checkpoint reached the storage but before
    Tune had the report: the restarted trial reports epoch 2 from that checkpoint, then goes
    on with epoch 3; each epoch is in Tune's history once, computed once, and no checkpoint
    Tune stored changes."""
    from maenas_ray.runs import FAULT_ENV
    from maenas_ray.sweep import main

    monkeypatch.setenv(FAULT_ENV, "search:exit-unreported@2")  # inherited by Ray's workers
    config = write_config(
        tmp_path, search={"epochs": 3}, tune={"num_samples": 1, "checkpoints_to_keep": 10}
    )
    store = tmp_path / "store"
    rc = main(["--config", str(config), "--storage-path", str(store), "--name", "lost",
               "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    (trial,) = _trial_dirs(store / "lost")
    assert (trial / "fault-injected-search-exit-unreported@2").is_file()  # it did happen
    assert "reporting epochs 2-2 to Ray Tune again" in out
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["pid"] != rows[-1]["pid"]  # epoch 3 came from the restarted process
    ours = {
        load_search_state(p)["epoch"]: Path(p).read_bytes()
        for p in glob.glob(str(trial / "search" / "checkpoint_*" / "search_state.pt"))
    }
    assert sorted(ours) == [1, 2, 3]  # each epoch computed once
    # Tune holds no copy of a checkpoint: its newest record points at epoch 3's
    (pointer_dir,) = trial.glob("checkpoint_0*")
    assert sorted(p.name for p in pointer_dir.iterdir()) == ["pointer.json"]
    pointer = json.loads((pointer_dir / "pointer.json").read_text())
    assert pointer["epoch"] == 3 and pointer["run"] == "search"
    assert load_search_state(pointer["checkpoint_path"])["epoch"] == 3
    assert rows[-1]["checkpoint_path"] == pointer["checkpoint_path"]
    assert rows[1]["checkpoint_path"].endswith("checkpoint_epoch_00002")  # the replayed one


@contextlib.contextmanager
def _small_disk(where: Path, megabytes: int):
    """A tmpfs of ``megabytes`` mounted at ``where`` (the tests run as root in CI)."""
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; returns it (delete it to free space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: every write reaches the disk
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


def test_a_full_disk_stops_the_sweep_with_one_line_and_loses_nothing(tmp_path):
    """The storage fills up while the trials search: the sweep stops with one error line
    and exit 1, Tune's state and the study journal stay whole (parseable, every line), and
    after space is freed ``--resume`` finishes every trial exactly once."""
    config = write_config(
        tmp_path, search={"epochs": 3}, tune={"num_samples": 3, "checkpoints_to_keep": 10}
    )
    with _small_disk(tmp_path / "disk", 64) as disk:
        store, log = disk / "store", tmp_path / "first.log"
        experiment = store / "f"
        proc = _start(config, store, log)
        _wait_for(proc, log, lambda: glob.glob(str(experiment / "trial_*" / "search"
                                                   / "checkpoint_epoch_*")),
                  "a first checkpoint")  # fmt: skip
        filler = _fill(disk)
        rc = proc.wait(timeout=300)
        out = log.read_text()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        assert rc == 1, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"no space left on {experiment}" in errors[0], out[-3000:]
        assert f"--resume --name f --storage-path {store}" in errors[0]
        # what is on the disk is whole: Tune's state, every journal line
        states = glob.glob(str(experiment / "experiment_state-*.json"))
        assert states and all(json.loads(Path(p).read_text()) for p in states)
        journal = (experiment / "optuna.journal").read_bytes()
        assert journal.endswith(b"\n") or not journal
        assert all(json.loads(line) for line in journal.splitlines())
        filler.unlink()
        resumed = _resume(config, store)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        _every_trial_once(experiment, trials=3, epochs=3)
        assert not list(experiment.rglob(".*.part-*"))  # no temporary file left behind
