"""Storage locations of experiments: a local or NFS directory, ``s3://`` or ``gs://``,
all through ``pyarrow.fs`` (no Ray needed)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pyarrow
import pyarrow.fs


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
