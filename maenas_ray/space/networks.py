"""Evaluation networks built from a genotype (the standard DARTS CIFAR and ImageNet networks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maenas_ray.space.cells import EvalCell, reduction_layers
from maenas_ray.space.genotype import Genotype
from maenas_ray.space.supernet import make_stem


@dataclass(frozen=True)
class NetworkStyle:
    """One evaluation protocol's network shape (docs/method.md §1.6)."""

    stem: str
    channels: int
    layers: int
    aux_pool_stride: int  # stride of the auxiliary head's 5x5 average pool
    aux_batchnorm: bool  # the ImageNet head has no BN after its 2x2 conv (as published)


STYLES: dict[str, NetworkStyle] = {
    "cifar": NetworkStyle(
        stem="cifar", channels=36, layers=20, aux_pool_stride=3, aux_batchnorm=True
    ),
    "imagenet": NetworkStyle(
        stem="imagenet", channels=48, layers=14, aux_pool_stride=2, aux_batchnorm=False
    ),
}


@dataclass(frozen=True)
class DatasetShape:
    num_classes: int
    image_size: int


#: Shapes of the datasets whose evaluation protocol is fixed by name.
KNOWN_DATASETS: dict[str, DatasetShape] = {
    "cifar10": DatasetShape(10, 32),
    "cifar100": DatasetShape(100, 32),
    "imagenet": DatasetShape(1000, 224),
}

#: Inputs smaller than this use the CIFAR-style network, larger ones the ImageNet style.
IMAGENET_STYLE_MIN_SIZE = 128


def style_for(image_size: int) -> str:
    return "imagenet" if image_size >= IMAGENET_STYLE_MIN_SIZE else "cifar"


class AuxiliaryHead(nn.Module):
    """DARTS auxiliary classifier at 2/3 depth."""

    def __init__(self, c: int, num_classes: int, pool_stride: int, batchnorm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=pool_stride, padding=0, count_include_pad=False),
            nn.Conv2d(c, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
        ]
        if batchnorm:
            layers.append(nn.BatchNorm2d(768))
        layers += [nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """Stem, ``layers`` derived cells, global pooling, linear classifier; optional auxiliary head.

    ``forward`` returns ``(logits, logits_aux)``; ``logits_aux`` is ``None`` unless the
    network has an auxiliary head and is training. ``drop_path_prob`` is the current
    drop-path probability (the retrain loop ramps it).
    """

    def __init__(
        self,
        genotype: Genotype,
        style: NetworkStyle,
        channels: int,
        layers: int,
        num_classes: int,
        auxiliary: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.genotype = genotype
        self.drop_path_prob = drop_path
        self.stem = make_stem(style.stem, channels)
        c_prev_prev, c_prev = self.stem.channels
        reduction_prev = self.stem.reduction_prev
        reductions = reduction_layers(layers)
        self.aux_index = reductions[1]
        c = channels
        cells = []
        c_aux = c_prev
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c *= 2
            edges, concat = (
                (genotype.reduce, genotype.reduce_concat)
                if reduction
                else (genotype.normal, genotype.normal_concat)
            )
            cell = EvalCell(edges, concat, c_prev_prev, c_prev, c, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
            if i == self.aux_index:
                c_aux = c_prev
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = (
            AuxiliaryHead(c_aux, num_classes, style.aux_pool_stride, style.aux_batchnorm)
            if auxiliary
            else None
        )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        s0, s1 = self.stem(x)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"build_network {name}={value!r}; expected a positive integer")
    return value


def build_network(
    genotype: Genotype,
    dataset: str,
    *,
    channels: int | None = None,
    layers: int | None = None,
    auxiliary: bool = True,
    drop_path: float = 0.0,
    num_classes: int | None = None,
    image_size: int | None = None,
) -> EvalNetwork:
    """The evaluation network of ``genotype`` for ``dataset``.

    ``cifar10`` / ``cifar100`` and other small images (< 128 px) get the CIFAR network
    (20 cells, C=36); ``imagenet`` and other large images get the ImageNet mobile network
    (14 cells, C=48, stride-8 stem). ``channels`` / ``layers`` override the style's size
    (smaller proxy networks). Datasets other than the known ones must give
    ``num_classes`` and ``image_size``.
    """
    if not isinstance(genotype, Genotype):
        raise TypeError(f"build_network expects a Genotype, got {type(genotype).__name__}")
    known = KNOWN_DATASETS.get(dataset)
    if known is None and (num_classes is None or image_size is None):
        raise ValueError(
            f"build_network: dataset {dataset!r} is not one of {', '.join(KNOWN_DATASETS)}; "
            "pass num_classes= and image_size= for it"
        )
    num_classes = _positive_int("num_classes", num_classes or known.num_classes)  # type: ignore[union-attr]
    image_size = _positive_int("image_size", image_size or known.image_size)  # type: ignore[union-attr]
    style = STYLES[style_for(image_size)]
    channels = _positive_int("channels", style.channels if channels is None else channels)
    layers = _positive_int("layers", style.layers if layers is None else layers)
    if layers < 3:
        raise ValueError(f"build_network layers={layers}; expected >= 3 (two reduction cells)")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"build_network drop_path={drop_path!r}; expected 0 <= drop_path < 1")
    if auxiliary:
        # the head sits after the second reduction cell; its 5x5 pool must leave >= 2x2
        stem_stride = 8 if style.stem == "imagenet" else 1
        aux_size = image_size // (stem_stride * 4)
        if (aux_size - 5) // style.aux_pool_stride + 1 < 2:
            raise ValueError(
                f"build_network: auxiliary head needs a larger input than image_size={image_size} "
                f"(its feature map would be {aux_size}x{aux_size}); pass auxiliary=False"
            )
    return EvalNetwork(genotype, style, channels, layers, num_classes, auxiliary, drop_path)


def count_parameters(model: nn.Module, exclude_auxiliary: bool = True) -> int:
    """Number of parameters; by default without the auxiliary head (as DARTS reports)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (exclude_auxiliary and "auxiliary" in name)
    )
