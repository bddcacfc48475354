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
