"""Stems and cells shared by the search supernet and the derived evaluation networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maenas_ray.space.fastpath import CellWeights, SharedInputs, concat, mixed_edge, preprocess
from maenas_ray.space.genotype import NODES, Edge
from maenas_ray.space.ops import OPS, PRIMITIVES, FactorizedReduce, Identity, ReLUConvBN, build_op
from maenas_ray.space.partial import channel_shuffle, partial_nodes


class Stem(nn.Module):
    """Maps the image to the two inputs ``(s0, s1)`` of the first cell.

    ``channels`` is ``(C(s0), C(s1))``; ``stride`` is the total downsampling of ``s1``;
    ``reduction_prev`` says that ``s0`` is at twice the resolution of ``s1``.
    """

    channels: tuple[int, int]
    stride: int
    reduction_prev: bool


class CifarStem(Stem):
    """DARTS CIFAR stem: one 3x3 conv + BN at full resolution; s0 = s1."""

    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        )
        self.channels = (c_out, c_out)
        self.stride = 1
        self.reduction_prev = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stem(x)
        return s, s


class ImageNetStem(Stem):
    """DARTS ImageNet (mobile) stem: three stride-2 3x3 convs; s0 at stride 4, s1 at stride 8."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, c // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )
        self.channels = (c, c)
        self.stride = 8
        self.reduction_prev = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem0(x)
        return s0, self.stem1(s0)


def reduction_layers(layers: int) -> tuple[int, int]:
    """Indices of the two reduction cells (DARTS: L//3 and 2L//3)."""
    return layers // 3, 2 * layers // 3


def _preprocess(
    c_prev_prev: int, c_prev: int, c: int, reduction_prev: bool, affine: bool
) -> tuple[nn.Module, nn.Module]:
    pre0: nn.Module = (
        FactorizedReduce(c_prev_prev, c, affine=affine)
        if reduction_prev
        else ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=affine)
    )
    return pre0, ReLUConvBN(c_prev, c, 1, 1, 0, affine=affine)


#: The buffers of a BatchNorm that tracks running statistics.
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def batch_statistics_only(module: nn.Module) -> None:
    """Make every non-affine BatchNorm in ``module`` normalise with batch statistics only.

    The search-time BatchNorms have no parameters and always run on batch statistics
    (search, evaluation and pictures all keep the supernet in training mode), so running
    averages would be state that nothing reads; without them an op's output depends on its
    input alone, which lets the fast path share it between edges.
    """
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d) and not m.affine:
            m.track_running_stats = False
            for name in BN_STATISTICS:
                setattr(m, name, None)


class MixedOp(nn.Module):
    """A search edge: ``Σ_k w_k · op_k(x)`` over every primitive (reference formulation;
    :func:`maenas_ray.space.fastpath.mixed_edge` computes the same, faster).

    With ``partial_channels = K > 1`` (PC-DARTS, :mod:`maenas_ray.space.partial`) the ops
    have ``c / K`` channels and see only the first ``c / K`` channels of ``x``; the others
    bypass them (2x2 max pooling on a stride-2 edge) and the two parts are shuffled.
    """

    def __init__(self, c: int, stride: int, partial_channels: int = 1) -> None:
        super().__init__()
        self.stride, self.partial_channels = stride, partial_channels
        width = c // partial_channels
        ops = []
        for name in PRIMITIVES:
            op = build_op(name, width, stride, affine=False)
            if OPS[name].parameter_free:
                op = nn.Sequential(op, nn.BatchNorm2d(width, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = self.partial_channels
        if k == 1:
            return sum(w * op(x) for w, op in zip(weights, self.ops, strict=True))  # type: ignore[return-value]
        head, rest = x[:, : x.shape[1] // k], x[:, x.shape[1] // k :]
        mixed = sum(w * op(head) for w, op in zip(weights, self.ops, strict=True))
        if self.stride == 2:
            rest = F.max_pool2d(rest, 2)
        return channel_shuffle(torch.cat([mixed, rest], dim=1), k)  # type: ignore[list-item]


class SearchCell(nn.Module):
    """A supernet cell: NODES nodes, each the sum of mixed edges from all earlier states.

    With ``partial_channels > 1`` the edges are PC-DARTS' partial-channel ones and a node
    weights each incoming edge by its ``edge_weights`` entry (the node-wise softmax of β).
    """

    def __init__(
        self,
        c_prev_prev: int,
        c_prev: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
        partial_channels: int = 1,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.partial_channels = partial_channels
        self.preprocess0, self.preprocess1 = _preprocess(
            c_prev_prev, c_prev, c, reduction_prev, affine=False
        )
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and j < 2 else 1, partial_channels)
            for i in range(NODES)
            for j in range(2 + i)
        )
        self.out_channels = NODES * c
        batch_statistics_only(self)

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        weights: torch.Tensor,
        fast: bool = True,
        edge_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (edge_weights is None) != (self.partial_channels == 1):
            raise ValueError("edge weights go with partial channels (partial_channels > 1) only")
        if fast:
            states = [preprocess(self.preprocess0, s0), preprocess(self.preprocess1, s1)]
            if edge_weights is not None:
                stride = 2 if self.reduction else 1
                k = self.partial_channels
                return concat(partial_nodes(self.edges, states, weights, edge_weights, k, stride))
        else:
            states = [self.preprocess0(s0), self.preprocess1(s1)]
        inputs = [SharedInputs(h, 2 if self.reduction else 1) for h in states]
        split = CellWeights(weights, states[0].shape[1]) if fast else None
        offset = 0
        for _ in range(NODES):
            s: torch.Tensor | None = None
            for j, h in enumerate(states):
                e = offset + j
                if split is not None:
                    ops = self.edges[e].ops
                    s = mixed_edge(ops, inputs[j], split.scalars[e], split.vectors[e], s)  # type: ignore[arg-type]
                else:
                    y = self.edges[e](h, weights[e])
                    if edge_weights is not None:
                        y = edge_weights[e] * y
                    s = y if s is None else s + y
            assert s is not None
            offset += len(states)
            states.append(s)
            inputs.append(SharedInputs(s))
        return concat(states[2:]) if fast else torch.cat(states[2:], dim=1)


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob``; rescale the kept ones."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """A derived cell: each node sums two chosen ops on two chosen earlier states."""

    def __init__(
        self,
        edges: Sequence[Edge],
        concat: Sequence[int],
        c_prev_prev: int,
        c_prev: int,
        c: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.reduction = reduction
        self.preprocess0, self.preprocess1 = _preprocess(
            c_prev_prev, c_prev, c, reduction_prev, affine=True
        )
        self.ops = nn.ModuleList(
            build_op(name, c, 2 if reduction and index < 2 else 1, affine=True)
            for name, index in edges
        )
        self.indices = [index for _, index in edges]
        self.concat = list(concat)
        self.out_channels = len(self.concat) * c

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self.ops) // 2):
            total = None
            for k in (2 * node, 2 * node + 1):
                op = self.ops[k]
                h = op(states[self.indices[k]])
                if self.training and drop_prob > 0.0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)  # type: ignore[arg-type]
        return torch.cat([states[i] for i in self.concat], dim=1)
