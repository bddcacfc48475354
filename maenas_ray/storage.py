"""Storage locations of experiments: a local or NFS directory, ``s3://`` or ``gs://``,
all through ``pyarrow.fs`` (no Ray needed); files written whole, on a full disk too
(``WholeFiles`` for Ray Tune's state, ``WholeLinesJournal`` for the Optuna study)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow
import pyarrow.fs
from optuna.storages.journal import JournalFileBackend


class StorageError(ValueError):
    """The storage path cannot hold an experiment (names the path and the reason)."""


@dataclass(frozen=True)
class Storage:
    """A storage location as Ray and pyarrow see it."""

    uri: str  # what Ray's storage_path gets: an absolute local path or a URI
    fs: pyarrow.fs.FileSystem
    path: str  # the location inside ``fs``

    @property
    def is_local(self) -> bool:
        """A local (or NFS-mounted) directory: the Optuna journal file can live there."""
        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.join(*parts)).type != pyarrow.fs.FileType.NotFound

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.join(*parts)) as f:
            return f.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        with self.fs.open_output_stream(self.join(*parts)) as f:
            f.write(text.encode())

    def experiment(self, name: str) -> Storage:
        sep = "" if self.uri.endswith("/") else "/"
        return Storage(f"{self.uri}{sep}{name}", self.fs, self.join(name))


def resolve_storage(storage_path: str) -> Storage:
    """``storage_path`` (a directory, ``~/...``, ``s3://...``, ``gs://...``) -> :class:`Storage`."""

    if "://" in storage_path:
        try:
            fs, path = pyarrow.fs.FileSystem.from_uri(storage_path)
        except Exception as err:  # pyarrow raises several types for bad URIs
            raise StorageError(
                f"storage_path = {storage_path!r}: not a usable URI ({err}); "
                "use a directory, s3://bucket/path or gs://bucket/path"
            ) from None
        return Storage(storage_path.rstrip("/"), fs, path.rstrip("/"))
    local = os.path.abspath(os.path.expanduser(storage_path))
    return Storage(local, pyarrow.fs.LocalFileSystem(), local)


def check_writable(storage: Storage, key: str = "storage_path") -> None:
    """Create the storage directory and write and delete a file there, or raise StorageError."""
    probe = storage.join(f".maenas-write-test-{uuid.uuid4().hex}")
    try:
        storage.fs.create_dir(storage.path, recursive=True)
        storage.write_text("ok", probe.rsplit("/", 1)[1])
        storage.fs.delete_file(probe)
    except (OSError, pyarrow.ArrowException) as err:
        raise StorageError(f"{key} = {storage.uri!r}: cannot write there ({err})") from None


class _WholeFile(io.RawIOBase):
    """A file written under a temporary name beside ``path`` and moved onto ``path`` when
    it is closed complete; a write that fails (a full disk) removes the temporary file, so
    the copy at ``path`` from before stays as it was."""

    def __init__(self, path: str) -> None:
        super().__init__()
        folder, name = os.path.split(path)
        self.path, self.tmp = path, os.path.join(folder, f".{name}.part-{uuid.uuid4().hex[:8]}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.failed = False

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except BaseException:
            self.failed = True
            raise

    def flush(self) -> None:
        if not self.file.closed:
            try:
                self.file.flush()
            except BaseException:
                self.failed = True
                raise

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self.failed:
                self.file.flush()
                os.fsync(self.file.fileno())
        except BaseException:
            self.failed = True
            raise
        finally:
            try:
                self.file.close()
            except OSError:
                self.failed = True
            if self.failed:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp)
            else:
                os.replace(self.tmp, self.path)
            super().close()


class WholeFiles(pyarrow.fs.FileSystemHandler):
    """The local filesystem, except that every file is written whole or not at all
    (:class:`_WholeFile`): Ray Tune's experiment state, the trials' results and their
    checkpoints, written through it, keep their last complete copy when the disk fills up
    or the writer is killed. (Object stores, s3:// and gs://, are whole-or-nothing already.)
    """

    def __init__(self) -> None:
        self.fs = pyarrow.fs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WholeFiles)

    def __hash__(self) -> int:
        return hash(WholeFiles)

    def get_type_name(self) -> str:
        return "local-whole-files"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list:
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path: str) -> None:
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as f:
            while chunk := source.read(1 << 20):
                f.write(chunk)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self.fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self.fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_WholeFile(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pyarrow.NativeFile:
        return self.fs.open_append_stream(path, metadata=metadata)


#: The temporary name of a file :class:`WholeFiles` is writing.
PARTIAL = re.compile(r"^\..+\.part-[0-9a-f]{8}$")


def remove_partial_files(storage: Storage) -> int:
    """Delete the temporary files that writers killed mid-write (or stopped by a full disk)
    left under ``storage`` (a local directory no sweep is writing to); returns how many."""
    if not storage.is_local or not storage.exists():
        return 0
    selector = pyarrow.fs.FileSelector(storage.path, recursive=True)
    removed = 0
    for info in storage.fs.get_file_info(selector):
        if info.type == pyarrow.fs.FileType.File and PARTIAL.match(info.base_name):
            with contextlib.suppress(OSError):
                storage.fs.delete_file(info.path)
                removed += 1
    return removed


def tune_filesystem(storage: Storage) -> pyarrow.fs.FileSystem:
    """The filesystem Ray Tune writes ``storage`` through: whole files on a local (or
    NFS) directory (:class:`WholeFiles`), the storage's own otherwise."""
    if storage.is_local:
        return pyarrow.fs.PyFileSystem(WholeFiles())
    return storage.fs


def repair_journal(path: str) -> int:
    """Cut a journal file back to its last whole line (a line cut short by a full disk or a
    kill was never acknowledged to Optuna); returns the bytes removed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return 0
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        os.truncate(path, keep)
    return len(data) - keep


class WholeLinesJournal(JournalFileBackend):
    """Optuna's journal file, whose lines are whole: a cut line left by a crash is removed
    when it is opened, and an append that fails (a full disk) is taken back, so the next
    append never lands behind half a line (which Optuna would refuse to read)."""

    def __init__(self, file_path: str) -> None:
        repair_journal(file_path)
        super().__init__(file_path)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        try:
            size = os.path.getsize(self._file_path)
        except FileNotFoundError:
            size = 0
        try:
            super().append_logs(logs)
        except OSError:
            # the sweep's driver is the journal's only writer: nothing was appended since
            with contextlib.suppress(OSError):
                os.truncate(self._file_path, size)
            raise
