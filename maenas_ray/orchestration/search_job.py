"""One sweep trial: a Ray Tune function that runs one MAE-DARTS search as a Ray Train job.

``search_trial`` (the Tune trainable, a lightweight driver) starts a ``TorchTrainer`` on the
trial's resources: one worker per GPU (data parallel when there are several), or one CPU
worker. Rank 0 reports every epoch to Ray Train with a checkpoint of the whole search
state; a Train callback hands each report to the driver, which reports it to Ray Tune with
that checkpoint. The Train run lives in the trial directory (``<trial>/search``), so a
restarted trial (Tune ``FailureConfig`` or ``--resume``) continues from its last
checkpoint, and at the end rank 0 copies ``genotype.json`` and the pictures into the trial
directory on the storage (local, NFS, s3:// or gs://).
"""

from __future__ import annotations

import os
import queue as std_queue
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue

from maenas_ray.config import Config, config_from_dict
from maenas_ray.engines import (
    CHECKPOINT_FILE,
    EpochReport,
    SearchCallback,
    load_search_state,
    run_search,
    save_search_state,
)

#: Sub-directory of a trial directory that holds its Ray Train run (checkpoints).
TRAIN_RUN = "search"
#: CPU the trial driver itself reserves; taken out of ``tune.cpus_per_trial``.
DRIVER_CPU = 0.01
#: Files every finished trial writes into its trial directory.
ARTIFACTS = ("genotype.json", "reconstruction.png", "alphas.png", "cells.png")


def worker_resources(cfg: Config) -> dict[str, float]:
    """Resources of one Ray Train worker: the trial's share, minus the driver's CPU."""
    workers = cfg.tune.workers()
    resources = {"CPU": (cfg.tune.cpus_per_trial - DRIVER_CPU) / workers}
    if cfg.tune.gpus_per_trial > 0:
        resources["GPU"] = cfg.tune.gpus_per_trial / workers
    return resources


#: Test-only fault injection: ``MAENAS_RAY_FAULT=exit@K`` in the environment of the Ray
#: workers makes rank 0 of every trial's Train job exit abruptly (``os._exit``) right
#: after reporting epoch K, once per trial (a marker file in the trial directory).
FAULT_ENV = "MAENAS_RAY_FAULT"


def checkpoint_dir_name(epoch: int, suffix: str = "") -> str:
    """``checkpoint_epoch_00007``: sorts by epoch, whatever the clocks of the nodes say."""
    return f"checkpoint_epoch_{epoch:05d}{suffix}"


class _ReportToTrain(SearchCallback):
    """Every rank reports each epoch; rank 0 attaches the checkpoint."""

    def __init__(self, rank: int, fs: pyarrow.fs.FileSystem, trial_dir: str) -> None:
        self.rank, self.fs, self.trial_dir = rank, fs, trial_dir

    def on_epoch_end(self, report: EpochReport) -> None:
        if self.rank != 0:
            ray.train.report(report.metrics)
            return
        with tempfile.TemporaryDirectory(prefix="maenas-ckpt-") as tmp:
            report.save_checkpoint(tmp)
            ray.train.report(
                report.metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(report.epoch),
            )
        self._inject_fault(report.epoch)

    def _inject_fault(self, epoch: int) -> None:
        fault = os.environ.get(FAULT_ENV, "")
        if fault != f"exit@{epoch}":
            return
        marker = f"{self.trial_dir}/fault-injected-{fault}"
        if self.fs.get_file_info(marker).type != pyarrow.fs.FileType.NotFound:
            return
        with self.fs.open_output_stream(marker) as f:
            f.write(b"the Train worker exited here on purpose\n")
        print(f"{FAULT_ENV}={fault}: exiting the Train worker", flush=True)
        os._exit(17)


def _upload(local_dir: Path, names: tuple[str, ...], fs: pyarrow.fs.FileSystem, dest: str) -> None:
    for name in names:
        source = local_dir / name
        if source.is_file():
            pyarrow.fs.copy_files(
                str(source),
                f"{dest}/{name}",
                source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=fs,
            )


def latest_search_state(
    fs: pyarrow.fs.FileSystem, run_dir: str
) -> tuple[dict[str, Any], str] | None:
    """The newest readable search checkpoint of a Train run directory, and its path.

    Scans the checkpoint directories on the storage itself rather than trusting only Ray
    Train's registry, so a checkpoint that was written just before a crash (but not yet
    registered) is not lost, and a truncated or corrupt newest one falls back to the one
    before it (with a warning naming the file).
    """
    selector = pyarrow.fs.FileSelector(run_dir, allow_not_found=True)
    infos = fs.get_file_info(selector)
    dirs = [i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory]
    names = sorted(dirs, reverse=True)  # checkpoint_epoch_<epoch>: the newest first
    for name in names:
        if not name.startswith("checkpoint_"):
            continue
        path = f"{run_dir}/{name}/{CHECKPOINT_FILE}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            continue
        with tempfile.TemporaryDirectory(prefix="maenas-load-") as tmp:
            local = Path(tmp) / CHECKPOINT_FILE
            try:
                pyarrow.fs.copy_files(
                    path, str(local), source_filesystem=fs,
                    destination_filesystem=pyarrow.fs.LocalFileSystem(),
                )  # fmt: skip
                return load_search_state(local), path
            except (OSError, ValueError) as err:
                warnings.warn(f"skipping search checkpoint {path}: {err}", stacklevel=2)
    return None


def search_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: one (data-parallel share of a) search, resumed if possible."""
    cfg = config_from_dict(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    threads = max(1, round(worker_resources(cfg)["CPU"]))
    torch.set_num_threads(threads)
    if cfg.search.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    fs, trial_dir = loop_config["filesystem"], loop_config["trial_dir"]
    state = None
    found = latest_search_state(fs, f"{trial_dir}/{TRAIN_RUN}")
    if found is not None:
        state, path = found
        if rank == 0:
            print(f"resuming the search from epoch {state['epoch']} ({path})", flush=True)
    elif (checkpoint := ray.train.get_checkpoint()) is not None:  # e.g. Tune's copy
        with checkpoint.as_directory() as directory:
            state = load_search_state(directory)
    with tempfile.TemporaryDirectory(prefix="maenas-artifacts-") as out:
        reporter = _ReportToTrain(rank, fs, trial_dir)
        result = run_search(cfg, reporter, resume_from=state, out_dir=out if rank == 0 else None)
        if state is not None and state["epoch"] >= cfg.search.epochs:
            # The search had finished before the restart: report its result once more.
            if rank == 0:
                with tempfile.TemporaryDirectory(prefix="maenas-ckpt-") as tmp:
                    save_search_state(state, tmp)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                    name = checkpoint_dir_name(state["epoch"], "_final")
                    ray.train.report(result.metrics, checkpoint=ckpt, checkpoint_dir_name=name)
            else:
                ray.train.report(result.metrics)
        if rank == 0:
            _upload(Path(out), ARTIFACTS, fs, trial_dir)


#: Longest wait of the Train controller for the driver's copy of a checkpoint to Tune.
COPY_TIMEOUT_S = 1800.0


class _ForwardReports(ray.train.UserCallback):
    """Runs in the Train controller: passes rank 0's metrics and checkpoint to the driver.

    With a checkpoint it waits until the driver has reported it to Tune (which copies it
    into the trial's checkpoint directory), so Train's ``num_to_keep`` pruning can never
    delete a checkpoint before Tune has its copy.
    """

    def __init__(self, reports: Queue, copied: Queue) -> None:
        self.reports, self.copied = reports, copied

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.reports.put((metrics[0], checkpoint))
        if checkpoint is not None:
            try:
                self.copied.get(timeout=COPY_TIMEOUT_S)
            except Empty:
                warnings.warn(
                    f"Tune did not take the checkpoint {checkpoint.path} within "
                    f"{COPY_TIMEOUT_S:.0f} s; going on",
                    stacklevel=2,
                )


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the (nested) keys of ``update`` set."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def search_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune trainable: the sweep's ``base`` config with this trial's tuned ``params``
    (e.g. ``{"search": {"mask_ratio": 0.6}}``), searched as a Ray Train job."""
    config = merge(base, params)
    cfg = config_from_dict(config)
    storage = ray.tune.get_context().get_storage()
    trial_dir, fs = storage.trial_fs_path, storage.storage_filesystem
    reports = Queue(actor_options={"num_cpus": 0})
    copied = Queue(actor_options={"num_cpus": 0})
    tune_checkpoint = ray.tune.get_checkpoint()
    resume = None
    if tune_checkpoint is not None:
        resume = ray.train.Checkpoint(tune_checkpoint.path, tune_checkpoint.filesystem)
    trainer = TorchTrainer(
        search_worker,
        train_loop_config={"config": config, "trial_dir": trial_dir, "filesystem": fs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.tune.workers(),
            use_gpu=cfg.tune.gpus_per_trial > 0,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=TRAIN_RUN,
            storage_path=trial_dir,
            storage_filesystem=fs,
            callbacks=[_ForwardReports(reports, copied)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.tune.checkpoints_to_keep),
            # a failed Train run fails the trial; Tune's FailureConfig restarts it
            failure_config=ray.train.FailureConfig(max_failures=0),
            # progress is Tune's table; Train's per-report INFO lines would repeat it
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        resume_from_checkpoint=resume,
    )
    errors: std_queue.Queue[BaseException] = std_queue.Queue()

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # re-raised in the trial below
            errors.put(err)

    thread = threading.Thread(target=fit, name="search-train-job", daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            metrics, checkpoint = reports.get(timeout=1.0)
        except Empty:
            continue
        if checkpoint is None:
            ray.tune.report(metrics)
            continue
        try:  # Tune copies the checkpoint into the trial's checkpoint_<n> directory
            ray.tune.report(
                metrics, checkpoint=ray.tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
            )
        finally:
            copied.put(True)
    thread.join()
    if not errors.empty():
        raise errors.get()
