"""Labelled batches for retraining (docs/method.md §1.6): the only place labels are read.

The same two paths as the search batches (``loaders.py``): in-memory datasets live on the
device as uint8 and are cropped, flipped, cut out and normalised there in a few batched
ops; on-disk datasets go through DataLoader workers. Data parallel, each rank keeps its
share (``shard=(rank, world)``) of every global training batch and of every held-out
chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, RandomSampler

from maenas_ray.config import DataConfig
from maenas_ray.data.datasets import ImageDataset, build_dataset
from maenas_ray.data.loaders import (
    DeviceBatches,
    ShardedBatches,
    image_transforms,
    normalize,
    seed_worker,
)

Batch = tuple[torch.Tensor, torch.Tensor]


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square at a random centre of each image (DARTS' Cutout:
    the square is clipped at the border; applied after normalisation)."""
    if size <= 0:
        return images
    b, _, h, w = images.shape
    centre = torch.stack(
        [
            torch.randint(0, h, (b,), generator=generator),
            torch.randint(0, w, (b,), generator=generator),
        ]
    ).to(images.device)
    rows = torch.arange(h, device=images.device)[None, :]
    cols = torch.arange(w, device=images.device)[None, :]
    half = size // 2
    in_rows = (rows >= centre[0, :, None] - half) & (rows < centre[0, :, None] + half)
    in_cols = (cols >= centre[1, :, None] - half) & (cols < centre[1, :, None] + half)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return images * keep[:, None].to(images.dtype)


class LabelledDeviceBatches(DeviceBatches):
    """:class:`DeviceBatches` with their labels, and cutout after normalisation."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        augment: bool,
        cutout_size: int,
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__(images, mean, std, batch_size, augment, generator, shard)
        self.labels, self.cutout = labels.to(images.device), cutout_size

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        for idx, x in self.global_batches():
            x = normalize(x, self.mean, self.std)
            if self.augment:
                x = cutout(x, self.cutout, self.generator)
            yield x[self.rank :: self.world], self.labels[idx][self.rank :: self.world]


class HeldOutChunks:
    """The held-out images in order, in chunks; each rank takes its share of every chunk."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.images, self.labels = images, labels.to(images.device)
        self.mean, self.std = mean.to(images.device), std.to(images.device)
        self.batch_size = batch_size
        self.rank, self.world = shard

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, self.images.shape[0], self.batch_size):
            sl = slice(i + self.rank, i + self.batch_size, self.world)
            x, y = self.images[sl], self.labels[sl]
            if x.shape[0]:
                yield normalize(x, self.mean, self.std), y


class _Labelled(torch.utils.data.Dataset):
    """(transformed image, label) for some indices of a dataset."""

    def __init__(self, dataset: ImageDataset, indices: list[int], transform, cutout_size: int):
        self.dataset, self.indices, self.transform = dataset, indices, transform
        self.cutout = cutout_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Batch:
        j = self.indices[i]
        x = self.transform(self.dataset.image(j))
        if self.cutout:
            x = cutout(x[None], self.cutout, torch.default_generator)[0]
        return x, torch.tensor(self.dataset.label(j))


class _HeldOutShares(torch.utils.data.Sampler[list[int]]):
    """Consecutive chunks of ``batch_size`` indices, each cut to this rank's share."""

    def __init__(self, n: int, batch_size: int, shard: tuple[int, int]) -> None:
        self.n, self.batch_size, (self.rank, self.world) = n, batch_size, shard

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, self.n, self.batch_size):
            share = list(range(i + self.rank, min(i + self.batch_size, self.n), self.world))
            if share:
                yield share


class _ToDevice:
    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class RetrainData:
    train: LabelledDeviceBatches | _ToDevice
    held_out: HeldOutChunks | _ToDevice
    num_classes: int
    train_images: int
    held_out_images: int


def retrain_data(
    cfg: DataConfig,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    *,
    cutout_size: int = 0,
    eval_images: int | None = None,
    shard: tuple[int, int] = (0, 1),
    datasets: tuple[ImageDataset, ImageDataset] | None = None,
    validation_fraction: float = 0.0,
) -> RetrainData:
    """Training batches (the training images, up to ``data.max_images``) and held-out
    chunks (the test / val split, up to ``eval_images``). ``batch_size`` is global.

    ``validation_fraction > 0`` holds out the last part of the training images instead
    of the test split (a proxy objective that tunes on it must not see the test set).
    """
    train, test = datasets if datasets is not None else (
        build_dataset(cfg, train=True), build_dataset(cfg, train=False)
    )  # fmt: skip
    n_train = len(train) if cfg.max_images is None else min(cfg.max_images, len(train))
    test_offset = 0
    if validation_fraction > 0:
        n_val = max(1, int(n_train * validation_fraction))
        n_train, test, test_offset = n_train - n_val, train, n_train - n_val
        n_test = n_val if eval_images is None else min(eval_images, n_val)
    else:
        n_test = len(test) if eval_images is None else min(eval_images, len(test))
    if n_train < batch_size:
        raise ValueError(
            f"{n_train} training images are fewer than retrain.batch_size={batch_size}"
        )
    loader = cfg.loader
    if loader == "auto":
        loader = "device" if train.images is not None and test.images is not None else "workers"
    if loader == "device" and (train.images is None or test.images is None):
        raise ValueError(f"data.loader = 'device' needs an in-memory dataset, not {cfg.dataset!r}")
    mean = torch.tensor(train.mean, dtype=torch.float32, device=device)
    std = torch.tensor(train.std, dtype=torch.float32, device=device)
    if loader == "device":
        assert train.images is not None and test.images is not None
        train_labels = torch.tensor([train.label(i) for i in range(n_train)])
        test_range = range(test_offset, test_offset + n_test)
        test_labels = torch.tensor([test.label(i) for i in test_range])
        train_batches = LabelledDeviceBatches(
            train.images[:n_train].to(device), train_labels, mean, std, batch_size,
            cfg.augment, cutout_size, generator, shard,
        )  # fmt: skip
        held_out = HeldOutChunks(
            test.images[test_offset : test_offset + n_test].to(device), test_labels, mean, std,
            batch_size, shard,
        )  # fmt: skip
        return RetrainData(train_batches, held_out, train.num_classes, n_train, n_test)
    pin = device.type == "cuda"
    # images from disk: the ImageNet recipe, DARTS' colour jitter included
    augmented = image_transforms(train, cfg.image_size, cfg.augment, color_jitter=True)
    plain = image_transforms(test, cfg.image_size, augment=False)
    view = _Labelled(train, list(range(n_train)), augmented, cutout_size if cfg.augment else 0)
    train_loader = DataLoader(
        view,
        batch_sampler=ShardedBatches(RandomSampler(view, generator=generator), batch_size, shard),
        worker_init_fn=functools.partial(seed_worker, shard[0]),
        num_workers=cfg.num_workers,
        pin_memory=pin,
        generator=generator,
        persistent_workers=cfg.num_workers > 0,
    )
    held_view = _Labelled(test, list(range(test_offset, test_offset + n_test)), plain, 0)
    held_loader = DataLoader(
        held_view,
        batch_sampler=_HeldOutShares(n_test, batch_size, shard),
        num_workers=cfg.num_workers,
        pin_memory=pin,
    )
    return RetrainData(
        _ToDevice(train_loader, device), _ToDevice(held_loader, device),
        train.num_classes, n_train, n_test,
    )  # fmt: skip
