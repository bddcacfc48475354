"""A stage's run directory on the storage, without Ray: checkpoints named by epoch, the
newest readable one (a corrupt one skipped with a warning), pruning to the newest few,
artifacts and TensorBoard images copied to the storage, local scratch directories that a
killed process's successor can remove, and a test-only fault injection.

Both ways of running a stage use them (``orchestration/stages.py``): a Ray Train job,
whose checkpoints Train writes in this layout, and the Tune trial process itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs
import torch

from maenas_ray.engines import EpochReport

#: Test-only fault injection: ``MAENAS_RAY_FAULT=<stage>:exit@K`` (stage ``search`` or
#: ``retrain``) in the environment of the Ray workers makes the process running that stage
#: (the Tune trial process, or rank 0 of the Train job) exit abruptly (``os._exit``) right
#: after reporting epoch K, once per run (a marker file next to the run);
#: ``<stage>:exit-unreported@K`` (a trial process) exits after epoch K's checkpoint is on
#: the storage but before Tune has the report.
FAULT_ENV = "MAENAS_RAY_FAULT"
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
    """One readable progress line of a retrain epoch (losses, then held-out accuracy),
    within 120 columns behind Ray's ``(RayTrainWorker pid=...)`` prefix; the training
    top-1 is in the metrics only."""
    return (
        f"epoch {epoch}/{epochs}  train {m['train_loss']:.4f}  test {m['test_loss']:.4f}"
        f" top-1 {m['top1']:.3f} top-5 {m['top5']:.3f}  lr {m['lr']:.3g}"
        f"  {m['images_per_sec']:.0f} img/s"
    )


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


def read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object in ``path`` on the storage, or None when there is no such file."""
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def use_cpus(cpus: float) -> None:
    """torch's threads for the CPUs Ray reserved (at least one)."""
    torch.set_num_threads(max(1, round(cpus)))
