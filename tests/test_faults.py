"""Faults a cluster inflicts on a sweep's driver, injected the real way: the driver's process
group SIGKILLed at a watched moment, and Ctrl-C (SIGINT). After ``--resume`` every trial
ends exactly once in Ray Tune and in the Optuna study, each epoch is computed once and
reported once, and every checkpoint stored before the fault is kept byte for byte."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pickle
import signal
import subprocess
import threading
import time
from pathlib import Path

import optuna
import pytest
from test_sweep import _results, _study, _sweep_command, _trial_dirs, write_config

from maenas_ray.engines import load_search_state
from maenas_ray.engines.retrain import load_retrain_state
from maenas_ray.orchestration.experiment import ORPHANED_DIR
from maenas_ray.results import load_experiment


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


#: The state file of each stage's checkpoint, and how it is loaded.
_STATE_FILES = {"search_state.pt": load_search_state, "retrain_state.pt": load_retrain_state}


def _stored_checkpoints(experiment: Path) -> dict[str, str]:
    """The SHA-256 of each file of every stage checkpoint stored under ``experiment``
    (``trial_*/<search|proxy>/checkpoint_epoch_*``) whose state loads, by its path relative
    to ``experiment``. A checkpoint cut off by a kill or a full disk is no checkpoint: a
    restarted trial may write it again."""
    hashes = {}
    for directory in sorted(experiment.glob("trial_*/*/checkpoint_epoch_*")):
        states = [directory / name for name in _STATE_FILES if (directory / name).is_file()]
        try:
            for state in states:
                _STATE_FILES[state.name](state)
        except ValueError:
            continue
        if not states:
            continue
        for path in sorted(directory.iterdir()):
            if path.is_file() and not path.name.startswith("."):  # not a file being written
                hashes[str(path.relative_to(experiment))] = _sha256(path)
    return hashes


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoints_unchanged(experiment: Path, before: dict[str, str]) -> None:
    """Every checkpoint file hashed in ``before`` is still stored with the same content
    (new ones may have been added). No test here prunes: each keeps 10 checkpoints
    (``tune.checkpoints_to_keep``, runs.prune_checkpoints) and runs at most 3 epochs. A trial
    Tune's saved state never knew is moved by ``--resume`` to ``orphaned/``, checkpoints
    and all: its files are looked for there."""
    assert before, "no stored checkpoint to compare"
    for relative, digest in before.items():
        path = experiment / relative
        if not path.is_file():
            path = experiment / ORPHANED_DIR / relative
        assert path.is_file(), f"{relative} was removed by the resume"
        assert _sha256(path) == digest, f"{relative} was changed by the resume"


def _journal_records(journal: Path) -> list[dict]:
    records = []
    for line in journal.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut by the kill
            records.append(json.loads(line))
    return records


def _completed_in_study(journal: Path) -> dict[int, float]:
    """The storage ids of the study trials the journal has COMPLETE, with their values."""
    return {
        r["trial_id"]: r["values"][0]
        for r in _journal_records(journal)
        if r.get("op_code") == 6 and r.get("state") == optuna.trial.TrialState.COMPLETE.value
    }


def _tune_state(experiment: Path) -> tuple[dict[str, str], dict[str, int]] | None:
    """What Ray Tune last saved of the experiment: each trial's status, and the searcher's
    map of Tune trial to study trial (storage id), the map ``ConsistentOptunaSearch``
    restores and reconciles with. None when no whole state is stored."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return None
    session = states[-1].name.removeprefix("experiment_state-").removesuffix(".json")
    searcher = experiment / f"searcher-state-{session}.pkl"
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
        with open(searcher, "rb") as f:
            ot_trials = pickle.load(f)["_ot_trials"]
    except (OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError):
        return None
    status = {}
    for state, _ in trials:
        state = json.loads(state) if isinstance(state, str) else state
        status[state["trial_id"]] = state["status"]
    return status, {tune_id: t._trial_id for tune_id, t in ot_trials.items()}


def _study_numbers(experiment: Path) -> dict[int, int]:
    """Study trial number by storage id."""
    return {t._trial_id: t.number for t in _study(experiment, experiment.name).trials}


def _window(moment: str, experiment: Path) -> tuple[dict[str, int], str]:
    """After the kill: the Tune trials (with their study trials' storage ids) that stand in
    the window ``moment`` names, and, when there are none, why the kill missed it."""
    journal = experiment / "optuna.journal"
    if moment == "mid-report":  # a trial killed with its first epoch stored, not its second
        trials = {
            trial.name: -1
            for trial in experiment.glob("trial_*")
            if (trial / "search" / "checkpoint_epoch_00001").is_dir()
            and not (trial / "search" / "checkpoint_epoch_00002").exists()
        }
        return trials, "every trial had stored both epochs or none"
    tune = _tune_state(experiment)
    if tune is None:
        return {}, "no whole Tune state was stored"
    status, ot_trials = tune
    complete = _completed_in_study(journal)
    if moment == "study-complete":  # the study has a trial COMPLETE, Tune's state not
        trials = {
            tune_id: ot_id
            for tune_id, ot_id in ot_trials.items()
            if ot_id in complete and status.get(tune_id) != "TERMINATED"
        }
        return trials, f"Tune's state already had {sorted(complete)} finished ({status})"
    # tune-state: Tune's state has a trial finished; the study's record of it is then lost
    trials = {t: ot_trials.get(t, -1) for t, s in status.items() if s == "TERMINATED"}
    if -1 in trials.values():  # the kill tore Tune's state from its searcher's: tested apart
        return {}, f"Tune's state and its searcher's were torn ({status}, {ot_trials})"
    return trials, f"no trial TERMINATED in Tune's state ({status})"


def _drop_tells(journal: Path, ot_ids: set[int]) -> None:
    """The study's COMPLETE records of the trials ``ot_ids`` lost, as if the driver died
    before writing them."""
    lines = journal.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill: left for the resume to repair
            record = {}
        if record.get("op_code") == 6 and record.get("trial_id") in ot_ids:
            continue
        kept.append(line)
    assert len(lines) - len(kept) == len(ot_ids), f"no COMPLETE record of each of {ot_ids}"
    journal.write_text("".join(kept))


#: How many times a window test starts its sweep again when the kill missed the window.
_ATTEMPTS = 3


@pytest.mark.parametrize("moment", ["study-complete", "tune-state", "mid-report"])
def test_a_driver_killed_between_study_and_tune_state_resumes(tmp_path, moment):
    """The three windows of a driver's death: just after the study recorded a trial
    COMPLETE (before Tune saved its own state); just after Tune saved its state with a
    finished trial, with the study's record of it lost; and between two reports. Whether
    the kill landed in the window is read from what it left on the storage; a sweep whose
    kill missed it is started again (a fresh storage), at most ``_ATTEMPTS`` times."""
    config = write_config(
        tmp_path, search={"epochs": 2}, tune={"num_samples": 3, "checkpoints_to_keep": 10}
    )

    def watched(experiment: Path):
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

        return {"study-complete": study_complete, "tune-state": tune_state,
                "mid-report": mid_report}[moment]  # fmt: skip

    missed = []
    for attempt in range(1, _ATTEMPTS + 1):
        store, log = tmp_path / f"store{attempt}", tmp_path / f"first{attempt}.log"
        experiment = store / "f"
        proc = _start(config, store, log)
        _wait_for(proc, log, watched(experiment), moment)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=60)
        in_window, why = _window(moment, experiment)
        if in_window:
            break
        missed.append(f"attempt {attempt}: {why}")
    else:
        pytest.fail(f"the kill missed the {moment} window {_ATTEMPTS} times: {missed}")
    journal = experiment / "optuna.journal"
    numbers = _study_numbers(experiment) if moment != "mid-report" else {}
    told = _completed_in_study(journal)
    if moment == "tune-state":
        _drop_tells(journal, set(in_window.values()))
    checkpoints = _stored_checkpoints(experiment)
    resumed = _resume(config, store)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "UpdateFinishedTrialError" not in resumed.stdout + resumed.stderr
    _every_trial_once(experiment, trials=3, epochs=2)
    _checkpoints_unchanged(experiment, checkpoints)
    # and the leaderboard reads every trial as done
    assert "unfinished" not in resumed.stdout.split("rank  trial", 1)[1]
    study = {t.number: t for t in _study(experiment, "f").trials}
    for tune_id, ot_id in in_window.items():
        number = numbers.get(ot_id)
        if moment == "tune-state":  # the study is told what Tune's state and directory hold
            line = f"resume: study trial {number}: finished as trial {tune_id} did"
            assert line in resumed.stdout, resumed.stdout[-3000:]
            assert study[number].value == told[ot_id]
        elif moment == "study-complete":  # finished in the study already: left as it was
            assert f"resume: study trial {number}:" not in resumed.stdout
            assert study[number].state == optuna.trial.TrialState.COMPLETE
            assert study[number].value == told[ot_id]


def test_a_torn_tune_snapshot_resumes_every_trial_once(tmp_path):
    """Tune writes its state (``experiment_state-*.json``) and its searcher's
    (``searcher-state-*.pkl``) one after the other; a driver killed between the two leaves a
    trial that Tune will restore and the searcher does not map to a study trial. Made here
    by a kill between two reports and the newest running trial taken out of the stored
    searcher's map, as the earlier searcher state on the storage had it. The resume gives
    that trial its study trial back and keeps its directory; nothing is lost or repeated."""
    config = write_config(
        tmp_path, search={"epochs": 2}, tune={"num_samples": 3, "checkpoints_to_keep": 10}
    )
    store, log = tmp_path / "store", tmp_path / "first.log"
    experiment = store / "f"
    proc = _start(config, store, log)

    def running_with_an_epoch() -> bool:
        state = _tune_state(experiment)
        return state is not None and any(
            s == "RUNNING" and (experiment / f"trial_{t}/search/checkpoint_epoch_00001").is_dir()
            for t, s in state[0].items()
        )

    _wait_for(proc, log, running_with_an_epoch, "a running trial with an epoch stored")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    status, ot_trials = _tune_state(experiment)
    victim = max((t for t, s in status.items() if s == "RUNNING"), key=lambda t: ot_trials[t])
    (searcher,) = experiment.glob("searcher-state-*.pkl")
    with open(searcher, "rb") as f:
        saved = pickle.load(f)
    number = _study_numbers(experiment)[saved["_ot_trials"].pop(victim)._trial_id]
    with open(searcher, "wb") as f:
        pickle.dump(saved, f)
    checkpoints = _stored_checkpoints(experiment)
    resumed = _resume(config, store)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    line = f"resume: study trial {number}: taken back for trial {victim}"
    assert line in resumed.stdout, resumed.stdout[-3000:]
    assert "no Tune trial has it" not in resumed.stdout  # nothing failed or moved aside
    assert not (experiment / ORPHANED_DIR).exists()
    _every_trial_once(experiment, trials=3, epochs=2)
    _checkpoints_unchanged(experiment, checkpoints)
    study = {t.number: t for t in _study(experiment, "f").trials}
    assert study[number].state == optuna.trial.TrialState.COMPLETE
    assert len(study) == 3


@pytest.mark.parametrize("to", ["driver", "process-group"])
def test_ctrl_c_stops_the_sweep_with_130_and_says_how_to_resume(tmp_path, to):
    """Ctrl-C: to the driver alone, and as a terminal sends it, to its whole foreground
    process group (the driver and every Ray process it started)."""
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
    if to == "driver":
        proc.send_signal(signal.SIGINT)
    else:  # the sweep runs in its own session, as in a terminal of its own
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
    out = log.read_text()
    assert "the sweep was interrupted:" in out
    assert f"python -m maenas_ray.sweep --resume --name f --storage-path {store}" in out
    assert "partial leaderboard" in out and "Tuner.restore(" not in out
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    # the interrupted trials are unfinished: left out of the score's correlation, counted
    interrupted = load_experiment(str(store / "f"))
    unfinished = [t for t in interrupted.trials() if t.status == "unfinished"]
    assert unfinished and interrupted.correlation().left_out["unfinished"] == len(unfinished)
    checkpoints = _stored_checkpoints(store / "f")
    resumed = _resume(config, store)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _every_trial_once(store / "f", trials=2, epochs=3)
    _checkpoints_unchanged(store / "f", checkpoints)


def _at_fault(experiment: Path, found: dict[str, tuple[bytes, bool]], stop: threading.Event):
    """Watch ``experiment`` until a trial's process has exited at the injected fault (its
    marker is stored), then put the bytes of the trial's stored search checkpoints into
    ``found`` by directory name, each with whether the file is older than the marker (as
    the fault left it: the restarted process takes seconds to start)."""
    while not stop.wait(0.01):
        markers = list(experiment.glob("trial_*/fault-injected-search-exit-unreported@2"))
        if not markers:
            continue
        died = markers[0].stat().st_mtime_ns
        for path in markers[0].parent.glob("search/checkpoint_epoch_*/search_state.pt"):
            before = path.stat().st_mtime_ns
            data = path.read_bytes()
            found[path.parent.name] = (data, max(before, path.stat().st_mtime_ns) <= died)
        return


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
    at_fault: dict[str, tuple[bytes, bool]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_at_fault, args=(store / "lost", at_fault, stop))
    watcher.start()
    try:
        rc = main(["--config", str(config), "--storage-path", str(store), "--name", "lost",
                   "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    finally:
        stop.set()
        watcher.join(timeout=10)
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
    # the checkpoints stored when the process died are those after the restart, byte for byte
    assert sorted(at_fault) == ["checkpoint_epoch_00001", "checkpoint_epoch_00002"]
    assert all(as_left for _, as_left in at_fault.values()), "read after a rewrite"
    assert {name: data for name, (data, _) in at_fault.items()} == {
        f"checkpoint_epoch_{e:05d}": ours[e] for e in (1, 2)
    }
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
        checkpoints = _stored_checkpoints(experiment)
        resumed = _resume(config, store)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        _every_trial_once(experiment, trials=3, epochs=3)
        _checkpoints_unchanged(experiment, checkpoints)
        assert not list(experiment.rglob(".*.part-*"))  # no temporary file left behind
