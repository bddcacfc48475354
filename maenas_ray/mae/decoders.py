"""Decoders that reconstruct the image from the supernet's multi-scale features
(docs/method.md §1.3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _block(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
    )


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class _CoarseToFine(nn.Module):
    """Project the deepest feature to ``width`` channels, then per finer scale: upsample to
    its size, optionally add its 1x1-projected lateral, run ``depth`` conv-BN-ReLU blocks."""

    laterals_used: bool

    def __init__(
        self,
        feature_channels: Sequence[int],
        width: int = 64,
        depth: int = 1,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"decoder depth={depth}; must be >= 1")
        self.project = nn.Conv2d(feature_channels[-1], width, 1)
        self.laterals = (
            nn.ModuleList(nn.Conv2d(c, width, 1) for c in feature_channels[-2::-1])
            if self.laterals_used
            else None
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*(_block(width) for _ in range(depth))) for _ in feature_channels[:-1]
        )
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(
        self, features: Sequence[torch.Tensor], output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        x = self.project(features[-1])
        for k, (stage, feat) in enumerate(zip(self.stages, features[-2::-1], strict=True)):
            x = _upsample(x, feat.shape[-2:])
            if self.laterals is not None:
                x = x + self.laterals[k](feat)
            x = stage(x)
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = _upsample(x, output_size)
        return self.head(x)


class HierarchicalDecoder(_CoarseToFine):
    """Fuse every scale, coarse to fine (the paper's decoder).

    The deepest feature is projected to ``width`` channels; for each finer scale the
    running map is upsampled x2, a 1x1-projected lateral of that scale's feature is
    added, and ``depth`` 3x3 conv-BN-ReLU blocks follow. The result is upsampled to the
    image size if the stem downsampled, and a 1x1 conv maps it to ``out_channels``.
    """

    laterals_used = True


class PlainDecoder(_CoarseToFine):
    """Ablation: the deepest feature only, with the same upsampling stages and blocks
    (finer features give their size, never their content)."""

    laterals_used = False


DecoderBuilder = Callable[..., nn.Module]

#: Registered decoders: name -> ``cls(feature_channels, width=, depth=)``.
DECODERS: dict[str, DecoderBuilder] = {
    "hierarchical": HierarchicalDecoder,
    "plain": PlainDecoder,
}


def build_decoder(name: str, feature_channels: Sequence[int], width: int, depth: int) -> nn.Module:
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; allowed: {', '.join(DECODERS)}")
    return DECODERS[name](feature_channels, width=width, depth=depth)
