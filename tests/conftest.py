import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_cluster_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own storage, whatever a cluster's shell exports."""
    from maenas_ray.cli import STORAGE_ENV

    monkeypatch.delenv(STORAGE_ENV, raising=False)


@pytest.fixture
def dead_pid() -> int:
    """The process id of a process that has just exited."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
