"""Datasets: a registry of image sources with class labels (labels are read by retraining only).

Every dataset exposes ``image(i)`` (no label) and ``label(i)``; the search reads images
through ``image`` alone. In-memory datasets (synthetic, CIFAR) also expose ``images``, the
whole set as a ``(N, 3, H, W)`` uint8 tensor, for the device-resident fast path.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from maenas_ray.config import DataConfig, not_one_of

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataset(Dataset, ABC):
    """Labelled images; ``__getitem__`` gives ``(image, label)`` for supervised use."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int
    #: the whole dataset as a uint8 (N, 3, H, W) tensor, or None when it lives on disk
    images: torch.Tensor | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def image(self, index: int) -> Any:
        """The image alone: a uint8 (3, H, W) tensor or a PIL image."""

    @abstractmethod
    def label(self, index: int) -> int:
        """The class label (retraining only; the search never calls it)."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.image(index), self.label(index)


class InMemoryImages(ImageDataset):
    images: torch.Tensor  # always in memory

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images (N, 3, H, W), got {images.dtype} {images.shape}"
            )
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return self.images.shape[0]

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def label(self, index: int) -> int:
        return int(self.labels[index])


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div_(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB; inputs in [0, 1], shape (N,); output (N, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    f = torch.minimum(k, 4 - k).clamp(0, 1)
    return v[:, None] - v[:, None] * s[:, None] * f


def _shape_mask(
    kind: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, freq: torch.Tensor
) -> torch.Tensor:
    """Pixels inside shape ``kind`` (0..NUM_SHAPES-1) centred at offset (dx, dy), size r."""
    ax, ay, rad = dx.abs(), dy.abs(), (dx.square() + dy.square()).sqrt()
    square = torch.maximum(ax, ay) < r
    masks = [
        rad < r,  # disk
        square,  # square
        ax + ay < r,  # diamond
        (rad < r) & (rad > 0.55 * r),  # ring
        ((ax < r / 3) & (ay < r)) | ((ay < r / 3) & (ax < r)),  # cross
        (dy > -r) & (dy < r) & (ax < (dy + r) / 2),  # triangle
        square & (torch.sin(dy * freq) > 0),  # horizontal stripes
        square & (torch.sin(dx * freq) > 0),  # vertical stripes
        square & (torch.sin(dx * freq) * torch.sin(dy * freq) > 0),  # checker
        (dx / r).square() + (dy / (0.5 * r)).square() < 1,  # flat ellipse
    ]
    out = torch.zeros_like(square)
    for k, m in enumerate(masks):
        out |= (kind == k) & m
    return out


NUM_SHAPES = 10


def make_synthetic(num_images: int, image_size: int, num_classes: int, seed: int) -> InMemoryImages:
    """Deterministic labelled images: a class-specific shape and hue on a smooth background.

    Class ``k`` draws shape ``k % 10`` (disk, square, diamond, ring, cross, triangle,
    striped and checkered squares, ellipse) in hue ``k / num_classes``; position, size,
    colour jitter, stripe frequency and the background gradient vary per image. Same
    arguments, same images, on every machine.
    """
    g = torch.Generator().manual_seed(seed)
    n, s = num_images, image_size

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)

    labels = torch.randint(0, num_classes, (n,), generator=g)
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s * 2 - 1
    yy, xx = coords.view(1, s, 1), coords.view(1, 1, s)
    r = u(0.3, 0.6)
    cx, cy = u(-0.9, 0.9) * (1 - r), u(-0.9, 0.9) * (1 - r)
    freq = u(6.0, 12.0) * math.pi / 2
    kind = (labels % NUM_SHAPES).view(n, 1, 1)
    fg_mask = _shape_mask(kind, xx - cx, yy - cy, r, freq).unsqueeze(1)  # (n, 1, s, s)

    hue = (labels.float() / num_classes + 0.04 * torch.randn(n, generator=g)) % 1.0

    def v(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    fg = _hsv_to_rgb(hue, v(0.6, 1.0), v(0.7, 1.0))
    bg_a = _hsv_to_rgb(v(0.0, 1.0), v(0.0, 0.3), v(0.15, 0.65))
    bg_b = _hsv_to_rgb(v(0.0, 1.0), v(0.0, 0.3), v(0.15, 0.65))
    angle = u(0.0, 2 * math.pi)
    t = ((xx * torch.cos(angle) + yy * torch.sin(angle)) * 0.5 + 0.5).clamp(0, 1).unsqueeze(1)
    background = bg_a.view(n, 3, 1, 1) * (1 - t) + bg_b.view(n, 3, 1, 1) * t
    img = torch.where(fg_mask, fg.view(n, 3, 1, 1), background)
    img = img + 0.02 * torch.randn(img.shape, generator=g)  # a little sensor noise
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    mean, std = _channel_stats(images)
    return InMemoryImages(images, labels, num_classes, mean, std)  # type: ignore[arg-type]


def _synthetic(cfg: DataConfig, train: bool) -> ImageDataset:
    if train:
        return make_synthetic(cfg.num_images, cfg.image_size, cfg.num_classes, cfg.seed)
    return make_synthetic(
        max(cfg.num_images // 5, 1), cfg.image_size, cfg.num_classes, cfg.seed + 1_000_003
    )


_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar(name: str) -> Callable[[DataConfig, bool], ImageDataset]:
    def build(cfg: DataConfig, train: bool) -> ImageDataset:
        from torchvision import datasets

        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = Path(cfg.root).expanduser()
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError:
            if not cfg.download:
                raise FileNotFoundError(
                    f"{name} is not under data.root={str(root)!r} and data.download is false; "
                    f"download it there or set data.download: true"
                ) from None
            try:
                ds = cls(str(root), train=train, download=True)
            except Exception as err:  # network errors come in many types
                raise FileNotFoundError(
                    f"{name} is not under data.root={str(root)!r} and downloading it failed "
                    f"({type(err).__name__}: {err}); offline machines need the dataset "
                    "copied there first"
                ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor(ds.targets)
        mean, std = _CIFAR_STATS[name]
        return InMemoryImages(images, labels, len(ds.classes), mean, std)

    return build


class FolderImages(ImageDataset):
    """Images in class subfolders (``root/<class>/<image>``), decoded on access."""

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        self.folder = ImageFolder(str(root))
        self.num_classes = len(self.folder.classes)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

    def __len__(self) -> int:
        return len(self.folder.samples)

    def image(self, index: int) -> Any:
        return self.folder.loader(self.folder.samples[index][0])

    def label(self, index: int) -> int:
        return self.folder.samples[index][1]


def _imagefolder(cfg: DataConfig, train: bool) -> ImageDataset:
    root = Path(cfg.root).expanduser()
    split = root / ("train" if train else "val")
    if split.is_dir():
        return FolderImages(split)
    if train:
        return FolderImages(root)
    raise FileNotFoundError(
        f"imagefolder: no held-out split at {str(split)!r}; put class folders under "
        f"{str(root / 'train')!r} and {str(root / 'val')!r}"
    )


#: Registered datasets: name -> ``build(cfg, train) -> ImageDataset``.
DATASETS: dict[str, Callable[[DataConfig, bool], ImageDataset]] = {
    "synthetic": _synthetic,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "imagefolder": _imagefolder,
}


def check_dataset(cfg: DataConfig) -> None:
    """``data.dataset`` is one of :data:`DATASETS` (a ``ConfigError`` otherwise)."""
    if cfg.dataset not in DATASETS:
        not_one_of("data.dataset", cfg.dataset, DATASETS)


def build_dataset(cfg: DataConfig, train: bool = True) -> ImageDataset:
    """The training (or held-out) images of ``cfg.dataset``."""
    check_dataset(cfg)
    return DATASETS[cfg.dataset](cfg, train)


def held_out_dataset(cfg: DataConfig) -> ImageDataset | None:
    """The dataset's own test/val split (the search reads its images only, for the
    label-free evaluation), or None where it has none: an ImageFolder root without a
    ``val`` folder."""
    if cfg.dataset == "imagefolder" and not (Path(cfg.root).expanduser() / "val").is_dir():
        return None
    return build_dataset(cfg, train=False)
