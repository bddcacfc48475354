"""The DARTS primitives: one registry, name -> constructor.

Each constructor takes ``(C, stride, affine)`` and returns a module mapping
``(B, C, H, W)`` to ``(B, C, H / stride, W / stride)``. The layer choices follow
the DARTS reference implementation exactly, so that parameter counts of derived
networks match the published evaluation networks to the parameter.

Adding a primitive is one entry in :data:`OPS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ReLUConvBN(nn.Sequential):
    """ReLU -> conv -> BN (the DARTS cell preprocessing block)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> dilated depthwise conv -> pointwise conv -> BN."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        dilation: int,
        affine: bool = True,
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                c_in,
                c_in,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=c_in,
                bias=False,
            ),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Two stacked (ReLU -> depthwise conv -> pointwise conv -> BN); stride on the first."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int,
        padding: int,
        affine: bool = True,
    ) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                c_in, c_in, kernel_size, stride=stride, padding=padding, groups=c_in, bias=False
            ),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel_size, stride=1, padding=padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The ``none`` op: a zero tensor of the output shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convs, concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True) -> None:
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even c_out, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


OpBuilder = Callable[[int, int, bool], nn.Module]


@dataclass(frozen=True)
class OpSpec:
    """A registered primitive.

    ``build(C, stride, affine)`` constructs it. ``parameter_free`` marks the ops
    that get a non-affine BatchNorm after them inside a search-time mixed edge
    (the pooling ops in DARTS), so that their output scale matches the others.
    """

    build: OpBuilder
    parameter_free: bool = False


def _skip(c: int, stride: int, affine: bool) -> nn.Module:
    return Identity() if stride == 1 else FactorizedReduce(c, c, affine=affine)


OPS: dict[str, OpSpec] = {
    "none": OpSpec(lambda c, stride, affine: Zero(stride)),
    "max_pool_3x3": OpSpec(
        lambda c, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1), parameter_free=True
    ),
    "avg_pool_3x3": OpSpec(
        lambda c, stride, affine: nn.AvgPool2d(
            3, stride=stride, padding=1, count_include_pad=False
        ),
        parameter_free=True,
    ),
    "skip_connect": OpSpec(_skip),
    "sep_conv_3x3": OpSpec(lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine=affine)),
    "sep_conv_5x5": OpSpec(lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine=affine)),
    "dil_conv_3x3": OpSpec(lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine=affine)),
    "dil_conv_5x5": OpSpec(lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine=affine)),
}

#: Primitive names in registry order; the column order of the α matrices.
PRIMITIVES: tuple[str, ...] = tuple(OPS)

#: The primitive that stands for "no edge"; never chosen by derivation.
NONE_OP = "none"


def build_op(name: str, channels: int, stride: int, affine: bool = True) -> nn.Module:
    """Construct the registered primitive ``name``; unknown names raise ``ValueError``."""
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; registered ops are {', '.join(PRIMITIVES)}")
    return OPS[name].build(channels, stride, affine)
