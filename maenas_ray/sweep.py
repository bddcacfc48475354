"""``python -m maenas_ray.sweep``: MAE-DARTS searches as Ray Tune trials, tuned by Optuna.

Every trial is one full search (a Ray Train job on the trial's GPUs or CPUs) that reports
each epoch to Ray Tune with a checkpoint; an Optuna sampler picks each trial's ``space``
values (mask ratio, patch size, decoder depth, ...) from the scores so far. Without
``--config`` the quickstart runs (synthetic data, tiny supernet, CPU, a few minutes).
The config is checked, and the storage path tried, before Ray starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from maenas_ray.cli import (
    STORAGE_ENV,
    UsageError,
    add_ray_arguments,
    check_num_cpus,
    check_shared_storage,
    config_overrides,
    connected_ray,
)
from maenas_ray.config import Config, ConfigError, load_config
from maenas_ray.lock import LockError, SweepLock
from maenas_ray.results import CONFIG_FILE, STUDY_JOURNAL, ExperimentError, load_experiment
from maenas_ray.storage import Storage, StorageError, remove_partial_files

QUICKSTART = Path(__file__).resolve().parent.parent / "tune_configs" / "quickstart.yaml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maenas_ray.sweep", description=__doc__)
    p.add_argument("--config", type=Path, help=f"sweep YAML (default: {QUICKSTART.name})")
    p.add_argument(
        "--storage-path",
        help=f"a directory, s3://... or gs://... (default: ${STORAGE_ENV}, else storage_path)",
    )
    p.add_argument("--name", help="experiment name, a directory under the storage path (name)")
    p.add_argument("--num-samples", type=int, help="number of trials (tune.num_samples)")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the experiment --name (default: the newest one of this config) "
        "with the config it started with",
    )  # fmt: skip
    add_ray_arguments(p, "tune.num_samples=16")
    return p


def _fresh(args: argparse.Namespace):  # -> (Config, Storage, name)
    from maenas_ray.storage import check_writable, resolve_storage
    from maenas_ray.sweep_space import load_sweep

    overrides = config_overrides(args)
    if args.name is not None:
        overrides.append(f"name={args.name}")
    if args.num_samples is not None:
        overrides.append(f"tune.num_samples={args.num_samples}")
    path = args.config or QUICKSTART
    cfg = load_sweep(path, overrides)
    name = cfg.name or f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, name=name)  # trials and sweep_config.yaml agree
    storage = resolve_storage(cfg.storage_path)
    check_writable(storage)
    experiment = storage.experiment(name)
    if experiment.exists():
        raise UsageError(
            f"experiment {experiment.uri} already exists; pass --resume to continue it "
            "or choose another --name"
        )
    return cfg, storage, name


def _resumed(args: argparse.Namespace):  # -> (Config, Storage, name)
    from maenas_ray.orchestration.experiment import CONFIG_FILE, load_sweep_config
    from maenas_ray.storage import check_writable, resolve_storage

    if args.overrides or args.num_samples is not None:
        raise UsageError(
            "--resume continues with the config the experiment started with "
            f"({CONFIG_FILE}); drop --set and --num-samples"
        )
    base: Config | None = None
    path = args.config or QUICKSTART
    storage_path = args.storage_path or os.environ.get(STORAGE_ENV) or None
    name = args.name
    if storage_path is None or name is None:
        base = load_config(path)
        storage_path = storage_path or base.storage_path
        name = name or base.name
    storage = resolve_storage(storage_path)
    if name is None:
        name = _newest(storage, f"{Path(path).stem}-")
    experiment = storage.experiment(name)
    if not experiment.exists(CONFIG_FILE):
        raise UsageError(f"--resume: {experiment.uri} holds no sweep experiment ({CONFIG_FILE})")
    check_writable(experiment, "--resume")
    return load_sweep_config(experiment), storage, name


def _newest(storage, prefix: str) -> str:
    import pyarrow.fs

    from maenas_ray.orchestration.experiment import CONFIG_FILE

    found = []
    if storage.exists():
        for info in storage.fs.get_file_info(pyarrow.fs.FileSelector(storage.path)):
            if (
                info.type == pyarrow.fs.FileType.Directory
                and info.base_name.startswith(prefix)
                and storage.exists(info.base_name, CONFIG_FILE)
            ):
                found.append(info.base_name)
    if not found:
        raise UsageError(
            f"--resume: no experiment named {prefix}* under {storage.uri}; pass --name"
        )
    return max(found)  # names end in the start time: the newest sorts last


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        # Everything that can be checked is checked before Ray starts.
        check_num_cpus(args)
        try:
            cfg, storage, name = _resumed(args) if args.resume else _fresh(args)
        except StorageError as err:
            raise UsageError(str(err)) from None
    except (ConfigError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run(args, cfg, storage, name)


def _run(args: argparse.Namespace, cfg: Config, storage, name: str) -> int:
    exp = storage.experiment(name)
    lock = SweepLock(exp)
    if not args.address and not args.resume:
        try:  # a local Ray gets this machine's CPUs and GPUs: they are checked before it starts
            _local_concurrency(args, cfg)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if args.resume:  # refused before Ray starts when the sweep is still running
        try:
            lock.acquire()
        except LockError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    with connected_ray(args) as connected:
        if not connected:
            lock.release()
            return 2
        try:
            outcome = _fit(args.resume, cfg, storage, name, lock)
        except (ConfigError, StorageError, LockError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # a trial's or the driver's own write on a full disk
            if not _no_space(err):
                raise
            print(
                f"error: no space left on {exp.uri}: the sweep stopped (its state as last "
                f"saved whole is kept); free space and run {resume_command(exp, name)}",
                file=sys.stderr,
            )
            return 1
        finally:
            lock.release()
    results, interrupted = outcome
    if interrupted or len(results) < cfg.tune.num_samples:
        # Ctrl-C (or Tune's SIGUSR1): Tune saved its state and stopped the running trials
        trials = load_experiment(exp.uri).trials() if exp.exists(CONFIG_FILE) else []
        done = sum(t.status != "unfinished" for t in trials)
        print(
            f"\nthe sweep was interrupted: {done} of {cfg.tune.num_samples} trials finished, "
            f"{len(trials) - done} unfinished, {cfg.tune.num_samples - len(trials)} not "
            f"started. Continue it with:\n  {resume_command(exp, name)}",
            flush=True,
        )
        _summary(cfg, exp, results.errors, partial=True)
        return INTERRUPTED
    return _summary(cfg, exp, results.errors)


def _local_concurrency(args: argparse.Namespace, cfg: Config) -> int:
    """Trials at once on the local Ray this sweep would start: its CPUs (``--num-cpus``, or
    this machine's) and this machine's CUDA devices, as Ray counts them. Raises ConfigError
    when one trial does not fit."""
    import torch
    from ray._private.utils import get_num_cpus  # what ray.init counts (cgroup limits too)

    from maenas_ray.orchestration import experiment as ex

    cpus = args.num_cpus or get_num_cpus()
    resources = {"CPU": cpus, "GPU": torch.cuda.device_count()}
    return ex.max_concurrent(cfg, resources, "the local Ray (this machine)")


def _no_space(err: BaseException | None) -> bool:
    """Whether ``err`` is, or was raised while handling, a full disk (Ray Tune reports an
    error of its callbacks as a ``TuneError`` raised while handling it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _fit(
    resume: bool, cfg: Config, storage: Storage, name: str, lock: SweepLock
) -> tuple[Any, bool]:
    """Restore or build the Tuner in the connected Ray and run it; its ResultGrid, and
    whether Ctrl-C stopped it."""
    import ray

    from maenas_ray.engines import objective_mode
    from maenas_ray.orchestration import experiment as ex

    exp = storage.experiment(name)
    check_shared_storage(storage)
    if resume:
        print(f"resuming {exp.uri}", flush=True)
        if removed := remove_partial_files(exp):
            print(f"resume: removed {removed} partial file(s) of writers that died", flush=True)
        tuner = ex.restore_tuner(cfg, exp)
    else:
        concurrency = ex.max_concurrent(cfg, ray.cluster_resources())
        exp.fs.create_dir(exp.path, recursive=True)
        lock.acquire()  # a sweep of the same name that started meanwhile holds it
        if exp.exists(ex.CONFIG_FILE):  # ... or one that has already come and gone
            raise LockError(f"experiment {exp.uri} was created meanwhile by another sweep")
        exp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), ex.CONFIG_FILE)
        print(
            f"sweep {name}: {cfg.tune.num_samples} trials, at most {concurrency} at once, "
            f"objective {cfg.objective.metric} ({objective_mode(cfg.objective)}) -> {exp.uri}",
            flush=True,
        )
        tuner = ex.build_tuner(cfg, storage, name, concurrency)
    with _tune_output() as interrupted:
        results = tuner.fit()
    return results, interrupted.is_set()


#: Exit status of an interrupted sweep (128 + SIGINT, as a shell reports Ctrl-C).
INTERRUPTED = 130


def resume_command(exp: Storage, name: str) -> str:
    """The command that continues the sweep in ``exp``."""
    storage = exp.uri.rstrip("/").rsplit("/", 1)[0]
    return f"python -m maenas_ray.sweep --resume --name {name} --storage-path {storage}"


class _DropRestoreHint(logging.Filter):
    """Ray Tune's own advice after an interruption (``Tuner.restore(...)``): this project's
    ``--resume`` is the way to continue a sweep."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


#: Tune's switch between its newer output and the classic one; only the classic one takes
#: the sweep's own progress table (``experiment.progress_table``).
TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
#: Tune's switch for its own Ctrl-C handler, which the sweep replaces (``_tune_output``).
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
#: Tune warns when it saves its state more often than every 5 s; the sweep wants it saved
#: after every checkpoint (each trial's newest is Tune's only one: ``num_to_keep=1``), so
#: short epochs would print a warning each time. 0 turns it off.
TUNE_SYNC_WARNING_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"


@contextlib.contextmanager
def _tune_output() -> Iterator[threading.Event]:
    """Tune's output for a sweep (the project's progress table, without Tune's restore
    hint) and its Ctrl-C: the event it yields is set when Ctrl-C stopped the sweep. The
    first Ctrl-C asks Tune to stop as its SIGUSR1 does (it saves its state and returns);
    a second one stops at once."""
    log, hint = logging.getLogger("ray.tune.tune"), _DropRestoreHint()
    log.addFilter(hint)
    interrupted = threading.Event()

    def ctrl_c(signum: int, frame: Any) -> None:
        interrupted.set()
        signal.signal(signal.SIGINT, previous)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGINT, ctrl_c)
    try:
        quiet = {TUNE_OUTPUT_ENV: "0", TUNE_SIGINT_ENV: "1", TUNE_SYNC_WARNING_ENV: "0"}
        with mock.patch.dict(os.environ, quiet):
            yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        log.removeFilter(hint)


def _summary(cfg: Config, exp: Storage, errors: list, partial: bool = False) -> int:
    """The leaderboard, the best genotype and where things are, read back from storage;
    ``partial``: the sweep was interrupted, and the leaderboard says so."""
    from maenas_ray.genotypes import leaderboard

    try:
        experiment = load_experiment(exp.uri)
    except ExperimentError as err:
        print(f"error: cannot read the results back from {exp.uri}: {err}", file=sys.stderr)
        return 1
    print()
    if partial:
        print("partial leaderboard (the sweep was interrupted; unfinished trials rank on their "
              "last report):")  # fmt: skip
    print(leaderboard(experiment))
    try:
        ((genotype, score, trial),) = experiment.best()
    except ExperimentError:
        pass  # no trial has a score yet: the table says so
    else:
        best = "best genotype so far" if partial else "best genotype"
        print(f"\n{best} ({cfg.objective.metric} = {score:.4g}, trial {trial.trial_id}):")
        print(repr(genotype))
    print(f"\nexperiment: {exp.uri}  (trial directories hold genotype.json and pictures)")
    if exp.is_local and cfg.tune.study_storage is None:
        print(f"Optuna study: optuna-dashboard {exp.join(STUDY_JOURNAL)}")
    print(f"report: python -m maenas_ray.report {exp.uri}")
    errored = [t.trial_id for t in experiment.trials() if t.status == "error"]
    if errors or errored:
        failed = f": {', '.join(errored)}" if errored else ""
        print(f"{max(len(errored), len(errors))} trial(s) failed{failed}; see their error.txt")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
