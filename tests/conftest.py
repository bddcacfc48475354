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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-node tests (``ray.cluster_utils.Cluster``) run first: a process that has run
    a local, loopback-only Ray (as every local sweep does) cannot drive trials on a cluster
    afterwards (measured: the GCS cancels them as owned by a dead worker)."""
    items.sort(key=lambda item: item.path.name != "test_cluster.py")
