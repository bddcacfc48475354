"""What the stages of this project share, whether they run as Ray Train jobs or in a Tune
trial process: per-epoch reports with checkpoints named by epoch, resumption from the
newest readable checkpoint on the storage, artifacts copied to the storage, forwarding of
reports to Ray Tune, local scratch directories, and a test-only fault injection.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue as std_queue
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.train.torch
import ray.tune
import torch
from ray.util.queue import Empty, Queue

from maenas_ray.engines import EpochReport, SearchCallback

#: Test-only fault injection: ``MAENAS_RAY_FAULT=<stage>:exit@K`` (stage ``search`` or
#: ``retrain``) in the environment of the Ray workers makes the process running that stage
#: (the Tune trial process, or rank 0 of the Train job) exit abruptly (``os._exit``) right
#: after reporting epoch K, once per run (a marker file next to the run);
#: ``<stage>:exit-unreported@K`` (a trial process) exits after epoch K's checkpoint is on
#: the storage but before Tune has the report.
FAULT_ENV = "MAENAS_RAY_FAULT"
#: Longest wait of the Train controller for the driver's copy of a checkpoint to Tune.
COPY_TIMEOUT_S = 1800.0


#: Local scratch directories: ``maenas-<kind>-<pid>-<random>`` in the temp directory, each
#: holding a file that its process keeps ``flock``-ed while it uses the directory.
_SCRATCH = re.compile(r"^maenas-(artifacts|ckpt|load|tb)-\d+-")
_IN_USE = ".in-use"


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[str]:
    """A local scratch directory (``kind``: artifacts, ckpt, load or tb), locked while in use,
    so that one left by a killed process can be told apart and removed. The lock file sits
    beside the directory it yields, so what is written there (a checkpoint) holds only
    what its writer puts in it."""
    with tempfile.TemporaryDirectory(prefix=f"maenas-{kind}-{os.getpid()}-") as path:
        fd = os.open(os.path.join(path, _IN_USE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            content = os.path.join(path, kind)
            os.mkdir(content)
            yield content
        finally:
            os.close(fd)  # releases the lock


def remove_stale_scratch(root: str | None = None) -> list[str]:
    """Remove the scratch directories that no process holds any more (a trial or worker
    killed mid-search never cleans up after itself); returns what was removed."""
    root = root or tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if not (_SCRATCH.match(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            try:
                fd = os.open(os.path.join(entry.path, _IN_USE), os.O_RDWR)
            except OSError:
                continue  # being created, or not ours to judge
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use by a live process
            finally:
                os.close(fd)
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def checkpoint_dir_name(epoch: int, suffix: str = "") -> str:
    """``checkpoint_epoch_00007``: sorts by epoch, whatever the clocks of the nodes say."""
    return f"checkpoint_epoch_{epoch:05d}{suffix}"


#: The torch.distributed backend of the Train jobs. Ray picks NCCL for any worker with a GPU
#: resource, which fails where the GPUs are only logical (no CUDA); "undefined" lets torch
#: pick by the worker's real accelerator: NCCL where CUDA is, gloo elsewhere.
PROCESS_GROUP_BACKEND = "undefined"


def torch_config() -> ray.train.torch.TorchConfig:
    return ray.train.torch.TorchConfig(backend=PROCESS_GROUP_BACKEND)


def prepare_model(net: torch.nn.Module) -> torch.nn.Module:
    """Ray Train's ``prepare_model`` (DDP) on the device the engine chose, so that a worker
    holding a logical GPU on a machine without CUDA trains on its CPU."""
    device = next(net.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ray.train.torch.prepare_model(net, move_to_device=device)


class NotSharedError(RuntimeError):
    """A node cannot see the storage the sweep writes to."""


def require_visible(fs: pyarrow.fs.FileSystem, path: str, what: str) -> None:
    """Fail with a clear error when ``path`` (written by the sweep's driver) is not visible
    from this node: a local ``storage_path`` that is not shared by every node."""
    if not isinstance(fs, pyarrow.fs.LocalFileSystem):
        return  # object storage is the same from every node
    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        node = ray.util.get_node_ip_address()
        raise NotSharedError(
            f"storage_path is not shared storage: {what} {path} is not visible from node "
            f"{node}; a multi-node sweep needs s3://, gs:// or a directory on NFS mounted at "
            "the same path on every node"
        )


def use_cpus(cpus: float) -> None:
    """torch's threads for the CPUs Ray reserved (at least one)."""
    torch.set_num_threads(max(1, round(cpus)))


def _no_report_lines(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Reporting training result")


def setup_worker(device: str, cpus: float) -> int:
    """Threads for this worker's CPUs, the worker's own GPU when it has one; the rank.
    Train's line per report (``Reporting training result ...``) is silenced: the stage
    prints its own line per epoch."""
    from ray.train.v2._internal.execution import context  # its logger is named by its file

    logging.getLogger(context.__file__).addFilter(_no_report_lines)
    use_cpus(cpus)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    return ray.train.get_context().get_world_rank()


def inject_fault(
    stage: str, epoch: int, fs: pyarrow.fs.FileSystem, marker_dir: str, kind: str = "exit"
) -> None:
    """Test-only: exit this process abruptly when ``MAENAS_RAY_FAULT`` is
    ``<stage>:<kind>@<epoch>``, once per run (a marker file in ``marker_dir``)."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault != f"{stage}:{kind}@{epoch}":
        return
    marker = f"{marker_dir}/fault-injected-{fault.replace(':', '-')}"
    if fs.get_file_info(marker).type != pyarrow.fs.FileType.NotFound:
        return
    with fs.open_output_stream(marker) as f:
        f.write(b"the process exited here on purpose\n")
    print(f"{FAULT_ENV}={fault}: exiting the process", flush=True)
    os._exit(17)


def retrain_line(epoch: int, epochs: int, m: dict[str, Any]) -> str:
    """One readable progress line of a retrain epoch."""
    return (
        f"epoch {epoch}/{epochs}  train loss {m['train_loss']:.4f} top-1 {m['train_top1']:.4f}"
        f"  test loss {m['test_loss']:.4f} top-1 {m['top1']:.4f} top-5 {m['top5']:.4f}"
        f"  lr {m['lr']:.3g}  {m['images_per_sec']:.0f} img/s"
    )


class ReportEpochs(SearchCallback):
    """In a Ray Train worker: every rank reports each epoch to Ray Train; rank 0 attaches
    the checkpoint (Train writes it to the run directory)."""

    def __init__(self, rank: int, stage: str, fs: pyarrow.fs.FileSystem, marker_dir: str):
        self.rank, self.stage, self.fs, self.marker_dir = rank, stage, fs, marker_dir

    def on_epoch_end(self, report: EpochReport) -> None:
        self._report(report.metrics, report.save_checkpoint, checkpoint_dir_name(report.epoch))
        if self.rank == 0:
            if self.stage == "retrain":
                print(retrain_line(report.epoch, report.epochs, report.metrics), flush=True)
            inject_fault(self.stage, report.epoch, self.fs, self.marker_dir)

    def final(self, metrics: dict[str, Any], save: Callable[[str], Any], epoch: int) -> None:
        """Report a run that had finished before its restart once more (rank 0 with its
        checkpoint)."""
        self._report(metrics, save, checkpoint_dir_name(epoch, "_final"))

    def _report(self, metrics: dict[str, Any], save: Callable[[str], Any], name: str) -> None:
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with scratch("ckpt") as tmp:
            save(tmp)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
            )


class TuneReports(SearchCallback):
    """In the Tune trial process itself (a one-worker trial, no Ray Train job): each epoch's
    checkpoint goes to ``<run_dir>/checkpoint_epoch_<n>`` on the storage (the newest ``keep``
    are kept, as Ray Train's ``num_to_keep`` does), then the epoch is reported to Ray Tune
    with the same checkpoint. The layout is that of a Train run, so resuming reads both."""

    rank = 0

    def __init__(
        self,
        stage: str,
        fs: pyarrow.fs.FileSystem,
        run_dir: str,
        keep: int,
        transform: Callable[[dict], dict] = lambda m: m,
    ) -> None:
        self.stage, self.fs, self.run_dir, self.keep = stage, fs, run_dir, keep
        self.transform = transform

    def on_epoch_end(self, report: EpochReport) -> None:
        marker_dir = self.run_dir.rsplit("/", 1)[0]
        name = checkpoint_dir_name(report.epoch)
        with scratch("ckpt") as tmp:
            report.save_checkpoint(tmp)
            self.fs.create_dir(f"{self.run_dir}/{name}", recursive=True)
            pyarrow.fs.copy_files(
                tmp, f"{self.run_dir}/{name}",
                source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=self.fs,
            )  # fmt: skip
            # pruned first: a scheduler that stops the trial does so inside report()
            prune_checkpoints(self.fs, self.run_dir, self.keep)
            log_reconstructions(report, self.fs, marker_dir)
            inject_fault(self.stage, report.epoch, self.fs, marker_dir, "exit-unreported")
            ray.tune.report(
                self.transform(report.metrics),
                checkpoint=ray.tune.Checkpoint.from_directory(tmp),
            )
        inject_fault(self.stage, report.epoch, self.fs, marker_dir)


#: The tag of each epoch's reconstruction grid in a trial's TensorBoard run.
TENSORBOARD_TAG = "reconstruction (original / masked / reconstructed, held-out images)"


def log_reconstructions(report: EpochReport, fs: pyarrow.fs.FileSystem, trial_dir: str) -> None:
    """A search epoch's reconstruction grid into the trial's TensorBoard run (the trial
    directory, beside Tune's scalars: ``tensorboard --logdir <experiment>``), one small
    event file per epoch, written locally and copied to the storage."""
    image = report.reconstructions()
    if image is None:
        return
    from torch.utils.tensorboard import SummaryWriter

    with scratch("tb") as tmp:
        writer = SummaryWriter(log_dir=tmp, filename_suffix=f".epoch{report.epoch:05d}")
        writer.add_image(TENSORBOARD_TAG, image, report.epoch)
        writer.close()
        pyarrow.fs.copy_files(
            tmp, trial_dir,
            source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs,
        )  # fmt: skip


def recorded_epoch(filename: str, load: Callable[[Path], dict]) -> int | None:
    """The last epoch of a stage whose checkpoint file is ``filename`` that Ray Tune has
    recorded for this trial (its latest checkpoint): 0 when Tune has no checkpoint, None
    when Tune's latest checkpoint belongs to another stage."""
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as directory:
        path = Path(directory) / filename
        if not path.is_file():
            return None
        try:
            return int(load(path)["epoch"])
        except (OSError, ValueError):
            return 0  # unreadable: report from the start of what the storage holds


def replay_unreported(
    fs: pyarrow.fs.FileSystem,
    run_dir: str,
    filename: str,
    load: Callable[[Path], dict],
    transform: Callable[[dict], dict],
) -> None:
    """Report to Ray Tune, once each, the epochs of a stage whose checkpoints reached the
    storage but whose reports never reached Tune (the trial died in between), the newest
    with its checkpoint. The stage then resumes after them, so every epoch is in Tune's
    history exactly once and none is computed twice."""
    recorded = recorded_epoch(filename, load)
    found = latest_state(fs, run_dir, filename, load)
    if recorded is None or found is None or int(found[0]["epoch"]) <= recorded:
        return
    state, path = found
    missing = json.loads(state["history"])[recorded : int(state["epoch"])]
    print(
        f"reporting epochs {recorded + 1}-{state['epoch']} to Ray Tune again: their "
        f"checkpoints are on the storage, their reports were lost ({path})",
        flush=True,
    )
    for metrics in missing[:-1]:
        ray.tune.report(transform(metrics))
    with scratch("load") as tmp:
        pyarrow.fs.copy_files(
            path, f"{tmp}/{filename}", source_filesystem=fs,
            destination_filesystem=pyarrow.fs.LocalFileSystem(),
        )  # fmt: skip
        ray.tune.report(transform(missing[-1]), checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def prune_checkpoints(fs: pyarrow.fs.FileSystem, run_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` ``checkpoint_epoch_*`` directories of a run."""
    selector = pyarrow.fs.FileSelector(run_dir, allow_not_found=True)
    names = sorted(
        i.base_name
        for i in fs.get_file_info(selector)
        if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_epoch_")
    )
    for name in names[: max(0, len(names) - keep)]:
        fs.delete_dir(f"{run_dir}/{name}")


def upload(local_dir: Path, names: tuple[str, ...], fs: pyarrow.fs.FileSystem, dest: str) -> None:
    """Copy the files ``names`` of ``local_dir`` that exist to ``dest`` on the storage."""
    for name in names:
        source = local_dir / name
        if source.is_file():
            pyarrow.fs.copy_files(
                str(source),
                f"{dest}/{name}",
                source_filesystem=pyarrow.fs.LocalFileSystem(),
                destination_filesystem=fs,
            )


def latest_state(
    fs: pyarrow.fs.FileSystem, run_dir: str, filename: str, load: Callable[[Path], dict]
) -> tuple[dict[str, Any], str] | None:
    """The newest readable checkpoint (``filename``) of a Train run directory, and its path.

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
        path = f"{run_dir}/{name}/{filename}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            continue
        with scratch("load") as tmp:
            local = Path(tmp) / filename
            try:
                pyarrow.fs.copy_files(
                    path, str(local), source_filesystem=fs,
                    destination_filesystem=pyarrow.fs.LocalFileSystem(),
                )  # fmt: skip
                return load(local), path
            except (OSError, ValueError) as err:
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
    return None


def run_config(
    name: str, storage_path: str, fs: pyarrow.fs.FileSystem, keep: int, callbacks: list
) -> ray.train.RunConfig:
    """The Train run ``<storage_path>/<name>``: no Train-level retries (the caller decides)."""
    return ray.train.RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=fs,
        callbacks=callbacks,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        failure_config=ray.train.FailureConfig(max_failures=0),
        # progress is printed by the callers; Train's per-report INFO lines would repeat it
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        # Train's print patch sends a worker's print to its logger as well as to stdout,
        # which shows every progress line twice
        worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
    )


class ForwardReports(ray.train.UserCallback):
    """Runs in the Train controller: passes rank 0's metrics and checkpoint to the driver.

    With a checkpoint it waits until the driver has reported it to Tune (which copies it
    into the trial's checkpoint directory), so Train's ``num_to_keep`` pruning can never
    delete a checkpoint before Tune has its copy.
    """

    def __init__(self) -> None:
        self.reports = Queue(actor_options={"num_cpus": 0})
        self.copied = Queue(actor_options={"num_cpus": 0})

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

    def fit_and_report_to_tune(
        self, trainer: Any, transform: Callable[[dict], dict] = lambda m: m
    ) -> None:
        """Run ``trainer.fit()`` and report each of its epochs to Ray Tune (this must be
        the trainer's callback); re-raises the job's error."""
        errors: std_queue.Queue[BaseException] = std_queue.Queue()

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # re-raised below, in the Tune trial
                errors.put(err)

        thread = threading.Thread(target=fit, name="train-job", daemon=True)
        thread.start()
        while thread.is_alive() or not self.reports.empty():
            try:
                metrics, checkpoint = self.reports.get(timeout=1.0)
            except Empty:
                continue
            if checkpoint is None:
                ray.tune.report(transform(metrics))
                continue
            try:  # Tune copies the checkpoint into the trial's checkpoint_<n> directory
                tune_checkpoint = ray.tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
                ray.tune.report(transform(metrics), checkpoint=tune_checkpoint)
            finally:
                self.copied.put(True)
        thread.join()
        if not errors.empty():
            raise errors.get()
