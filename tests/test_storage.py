"""Writes on a full disk, on a real one (a small tmpfs): a file written through the sweep's
local filesystem (``storage.WholeFiles``: Tune's state, results, checkpoints) keeps its
last whole copy, and an Optuna journal append that fails is taken back, so the study reads
as it was and takes appends again once there is space."""

import errno
import os
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from test_faults import _fill, _small_disk

from maenas_ray.storage import PARTIAL, WholeLinesJournal, resolve_storage, tune_filesystem


@pytest.fixture
def disk(tmp_path):
    with _small_disk(tmp_path / "disk", 4) as where:
        yield where


def _leave_a_page(filler: Path) -> None:
    """Free one page of the full disk: the next large write is cut part way."""
    os.truncate(filler, filler.stat().st_size - 4096)


def _partial_files(where: Path) -> list[str]:
    return [p.name for p in where.rglob("*") if PARTIAL.match(p.name)]


def test_a_file_cut_short_by_a_full_disk_never_replaces_the_whole_one(disk):
    fs = tune_filesystem(resolve_storage(str(disk)))
    path = str(disk / "experiment_state.json")
    with fs.open_output_stream(path) as f:
        f.write(b'{"whole": true}')
    filler = _fill(disk)
    _leave_a_page(filler)
    with pytest.raises(OSError) as raised, fs.open_output_stream(path) as f:
        f.write(b"x" * (1 << 20))  # more than is left
    assert raised.value.errno == errno.ENOSPC or "No space left" in str(raised.value)
    assert Path(path).read_bytes() == b'{"whole": true}'
    assert _partial_files(disk) == []  # the temporary copy went with the failed write
    filler.unlink()
    with fs.open_output_stream(path) as f:  # with space again, writes go through
        f.write(b'{"whole": "again"}')
    assert Path(path).read_bytes() == b'{"whole": "again"}'


def test_a_journal_append_that_fails_for_space_is_taken_back(disk):
    journal = str(disk / "optuna.journal")
    study = optuna.create_study(study_name="s", storage=JournalStorage(WholeLinesJournal(journal)))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    before = Path(journal).read_bytes()
    filler = _fill(disk)
    _leave_a_page(filler)
    with pytest.raises(OSError):
        # a parameter record larger than the page left: its append is cut part way
        study.optimize(lambda t: t.suggest_float("x" * 20000, 0, 1), n_trials=1)
    cut = Path(journal).read_bytes()
    assert cut.startswith(before) and cut.endswith(b"\n")  # whole lines only
    assert b"x" * 20000 not in cut
    filler.unlink()
    again = optuna.load_study(study_name="s", storage=JournalStorage(WholeLinesJournal(journal)))
    assert [t.state for t in again.trials][:2] == [optuna.trial.TrialState.COMPLETE] * 2
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    reread = optuna.load_study(study_name="s", storage=JournalStorage(WholeLinesJournal(journal)))
    assert len([t for t in reread.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 3
