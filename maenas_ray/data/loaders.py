"""Image batches for the search: W-split and A-split, images only (labels are never read).

Two paths give the same stream of normalised float batches on the target device:

- :class:`DeviceBatches` — the fast path for datasets that fit in memory: the uint8
  images live on the device, and shuffling, random crop, flip and normalisation run there
  as a few batched tensor ops (no per-image Python work, no worker processes).
- :class:`WorkerBatches` — the general path: a ``DataLoader`` with worker processes
  decoding and augmenting images (ImageFolder / ImageNet).

All randomness comes from one CPU ``torch.Generator`` whose state is checkpointed, so a
resumed search sees the same batches as an uninterrupted one.

Data parallel (``shard=(rank, world)``): every rank draws the same global batch of
``batch_size`` image indices and keeps every ``world``-th one from position ``rank``, so
the ranks together see the images a single process would, and their generators stay
equal. On the device path the augmentation is drawn for the global batch too (the same
pixels as one process); DataLoader workers draw it per rank (seeded by rank and worker).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from maenas_ray.config import DataConfig
from maenas_ray.data.datasets import ImageDataset, build_dataset, held_out_dataset


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float, ``(x / 255 - mean) / std`` per channel."""
    x = images.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Batched random crop (zero padding, as torchvision's RandomCrop) and horizontal flip."""
    b, _, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
        rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
        cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
        batch = torch.arange(b, device=images.device)[:, None, None]
        images = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        images = images.permute(0, 3, 1, 2)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device).view(b, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


class DeviceBatches:
    """Batches drawn from a uint8 image tensor resident on the device."""

    def __init__(
        self,
        images: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        batch_size: int,
        augment: bool,
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.images = images
        self.rank, self.world = shard
        self.mean, self.std = mean.to(images.device), std.to(images.device)
        self.batch_size = batch_size
        self.augment = augment
        self.padding = images.shape[-1] // 8  # 4 pixels at 32 px, as the CIFAR recipe
        self.generator = generator

    def __len__(self) -> int:
        return self.images.shape[0] // self.batch_size

    def global_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled pass: (indices, cropped and flipped uint8 images) of each global
        batch; the augmentation is drawn for the whole batch, the same on every rank."""
        order = torch.randperm(self.images.shape[0], generator=self.generator)
        order = order.to(self.images.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_crop_flip(x, self.padding, self.generator)
            yield idx, x

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _, x in self.global_batches():
            yield normalize(x[self.rank :: self.world], self.mean, self.std)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images, normalised, not augmented (a fixed evaluation set)."""
        return normalize(self.images[:n], self.mean, self.std)


class _ImagesOnly(Dataset):
    """A view of some images of a dataset, transformed; never touches labels."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], transform) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.dataset.image(self.indices[i]))


def image_transforms(
    dataset: ImageDataset, image_size: int, augment: bool, color_jitter: bool = False
):
    """torchvision v2 transforms from a dataset image to a normalised float tensor.

    ``color_jitter`` adds DARTS' ImageNet retraining jitter (brightness, contrast and
    saturation 0.4, hue 0.2) to the augmentation of images read from disk."""
    from torchvision.transforms import v2

    steps: list = []
    on_disk = dataset.images is None
    if on_disk:
        steps.append(v2.PILToTensor())
        if augment:
            steps.append(v2.RandomResizedCrop(image_size, antialias=True))
        else:
            steps += [
                v2.Resize(round(image_size * 8 / 7), antialias=True),
                v2.CenterCrop(image_size),
            ]
    elif augment:
        steps.append(v2.RandomCrop(image_size, padding=image_size // 8))
    if augment:
        steps.append(v2.RandomHorizontalFlip())
        if on_disk and color_jitter:
            steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(dataset.mean, dataset.std)]
    return v2.Compose(steps)


class ShardedBatches(BatchSampler):
    """Global batches of indices (drop_last), each cut to this rank's share."""

    def __init__(self, sampler: RandomSampler, batch_size: int, shard: tuple[int, int]) -> None:
        super().__init__(sampler, batch_size, drop_last=True)
        self.rank, self.world = shard

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield batch[self.rank :: self.world]


def seed_worker(rank: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: augmentation draws that differ between ranks."""
    torch.manual_seed(torch.initial_seed() + 1_000_003 * rank)


class WorkerBatches:
    """Batches from a DataLoader with worker processes (the general path)."""

    def __init__(
        self,
        dataset: ImageDataset,
        indices: Sequence[int],
        image_size: int,
        batch_size: int,
        augment: bool,
        num_workers: int,
        device: torch.device,
        generator: torch.Generator,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.dataset, self.indices, self.image_size = dataset, list(indices), image_size
        self.device = device
        view = _ImagesOnly(dataset, indices, image_transforms(dataset, image_size, augment))
        batches = ShardedBatches(RandomSampler(view, generator=generator), batch_size, shard)
        self.loader = DataLoader(
            view,
            batch_sampler=batches,
            worker_init_fn=functools.partial(seed_worker, shard[0]),
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=generator,
            persistent_workers=num_workers > 0,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x in self.loader:
            yield x.to(self.device, non_blocking=True)

    def head(self, n: int) -> torch.Tensor:
        transform = image_transforms(self.dataset, self.image_size, augment=False)
        x = torch.stack([transform(self.dataset.image(i)) for i in self.indices[:n]])
        return x.to(self.device)


Batches = DeviceBatches | WorkerBatches


@dataclass
class SearchData:
    """The two search splits and a fixed evaluation set, all images only.

    The evaluation images are held out from both splits: the first images of the
    dataset's own test/val split (``eval_split = "test"``), or, for a dataset without one,
    training images that neither split holds (``"train"``). The index lists say which
    images of their split each set holds."""

    w: Batches  # weights
    a: Batches  # architecture
    eval_images: torch.Tensor  # fixed, normalised with the training images' statistics
    mean: torch.Tensor
    std: torch.Tensor
    loader: str  # "device" or "workers"
    w_indices: list[int]  # of the training images
    a_indices: list[int]  # of the training images
    eval_indices: list[int]  # of the images of eval_split
    eval_split: str  # "test" or "train"


def fixed_images(
    dataset: ImageDataset,
    indices: Sequence[int],
    image_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """The images ``indices`` of ``dataset``, not augmented, normalised with ``mean`` /
    ``std`` (in-memory images) or the dataset's own statistics (decoded from disk)."""
    if dataset.images is not None and dataset.images.shape[-1] == image_size:
        return normalize(dataset.images[list(indices)].to(device), mean, std)
    transform = image_transforms(dataset, image_size, augment=False)
    return torch.stack([transform(dataset.image(i)) for i in indices]).to(device)


def search_data(
    cfg: DataConfig,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    eval_images: int,
    dataset: ImageDataset | None = None,
    shard: tuple[int, int] = (0, 1),
) -> SearchData:
    """Split the training images into W and A halves, build the batch streams and take
    ``eval_images`` held-out evaluation images (:class:`SearchData`).

    The split is a fixed permutation from ``cfg.seed``; shuffling and augmentation draw
    from ``generator``. ``batch_size`` is the global batch; with ``shard=(rank, world)``
    the streams yield this rank's ``batch_size / world`` images of it. ``dataset``
    overrides the registry (tests); it has no test split, so its evaluation images are
    held out from its training images.
    """
    held_out = None
    if dataset is None:
        dataset, held_out = build_dataset(cfg, train=True), held_out_dataset(cfg)
    n = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    if held_out is None:  # no test split: the evaluation images come first, out of both
        eval_split, eval_idx = "train", sorted(order[:eval_images])
        order = order[len(eval_idx) :]
        if len(order) < 2:
            raise ValueError(
                f"{n} training images cannot hold {len(eval_idx)} evaluation images "
                "(search.eval_images) and a W- and an A-split"
            )
    else:
        eval_split, eval_idx = "test", list(range(min(eval_images, len(held_out))))
    n_w = int(len(order) * cfg.train_portion)
    w_idx, a_idx = sorted(order[:n_w]), sorted(order[n_w:])
    for split, idx in (("W", w_idx), ("A", a_idx)):
        if len(idx) < batch_size:
            raise ValueError(
                f"the {split}-split has {len(idx)} images (data.train_portion="
                f"{cfg.train_portion} of {len(order)}), fewer than search.batch_size="
                f"{batch_size}; use more images or a smaller batch"
            )
    loader = cfg.loader
    if loader == "auto":
        loader = "device" if dataset.images is not None else "workers"
    if loader == "device" and dataset.images is None:
        raise ValueError(
            f"data.loader = 'device' needs an in-memory dataset; {cfg.dataset!r} is read "
            "from disk: use 'workers' or 'auto'"
        )
    mean = torch.tensor(dataset.mean, dtype=torch.float32, device=device)
    std = torch.tensor(dataset.std, dtype=torch.float32, device=device)
    w: Batches
    a: Batches
    if loader == "device":
        assert dataset.images is not None
        if dataset.images.shape[-1] != cfg.image_size or dataset.images.shape[-2] != cfg.image_size:
            raise ValueError(
                f"data.image_size = {cfg.image_size}: the {cfg.dataset} images are "
                f"{dataset.images.shape[-2]}x{dataset.images.shape[-1]}"
            )
        all_images = dataset.images.to(device)
        w, a = (
            DeviceBatches(
                all_images[torch.tensor(idx, device=device)], mean, std, batch_size, cfg.augment,
                generator, shard,
            )
            for idx in (w_idx, a_idx)
        )  # fmt: skip
    else:
        w, a = (
            WorkerBatches(
                dataset, idx, cfg.image_size, batch_size, cfg.augment, cfg.num_workers, device,
                generator, shard,
            )
            for idx in (w_idx, a_idx)
        )  # fmt: skip
    evaluation = fixed_images(
        held_out if held_out is not None else dataset, eval_idx, cfg.image_size, mean, std, device
    )
    return SearchData(w, a, evaluation, mean, std, loader, w_idx, a_idx, eval_idx, eval_split)
