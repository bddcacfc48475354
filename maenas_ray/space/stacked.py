"""The edges leaving one state, computed together: one wide op per primitive, not one
narrow op per edge (the fast path of PC-DARTS' partial-channel edges).

Every edge leaving a state reads the same input, and each primitive's layers act on the
edges' channels independently, so ``n`` edges' copies of a primitive are one op on ``n``
times the channels, with the edges' outputs side by side (edge-major: channels
``i * c ... (i + 1) * c - 1`` are edge ``i``'s):

- the first depthwise convolution reads the shared input with ``n`` filters per channel
  (a channel multiplier), which puts its outputs channel-major (``g * n + i``);
- a 1x1 convolution is one of ``n c x n c`` channels whose weight is block-diagonal, the
  edges' own weights on the diagonal and exact zeros elsewhere; after the first depthwise
  its columns are permuted from channel-major to edge-major;
- later depthwise convolutions and the BatchNorms (per channel, batch statistics only)
  act channel by channel anyway: their weights are the edges' ones concatenated;
- a 1x1 convolution that reads the shared input itself (``ReLUConvBN``) has the edges'
  weights stacked by rows: every edge reads all the input channels;
- ``FactorizedReduce``: its two 1x1 convolutions of the even and odd pixels are one of
  both, with the weight ``[[conv_1, 0], [0, conv_2]]`` per edge;
- the parameter-free ops and the identity (computed once for the state, shared by all its
  edges) are mixed into the edges' channels by one 1x1 convolution whose weight is
  ``kron(w, I)``: each edge's weight of each op times the identity on the channels.

The result is the same sums as op by op (the zeros add nothing); what changes is the
number of calls. At C=16, K=4 an edge's op has 4 channels, where a CPU convolution or
BatchNorm costs about as much per call as per element; one call for all the edges of a
state took a fifth of the time of one call per edge for a ``sep_conv_3x3`` (4 edges,
32x4x32x32, forward and backward, 2 threads). The parameters stay the edges' own, so the
checkpoints and the reference formulation are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maenas_ray.space.fastpath import (
    _PARAMETER_FREE,
    _SKIPPED,
    SharedInputs,
    _format,
    depthwise,
    mixed_edge,
    scaled_batch_norm,
)
from maenas_ray.space.genotype import NODES
from maenas_ray.space.ops import FactorizedReduce, Identity


class _Split(torch.autograd.Function):
    """``x`` split along the channels into new contiguous tensors in ``x``'s memory format
    (copies, never views: they may be added to in place).

    The backward concatenates their gradients in that format: a channel slice's own
    backward makes an NCHW gradient, on which the CPU kernels after it are slower.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.format = _format(x)
        return tuple(p.clone(memory_format=ctx.format) for p in x.split(sizes, dim=1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return torch.cat(grads, dim=1).contiguous(memory_format=ctx.format), None


def chunks(x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``x`` cut into consecutive groups of ``sizes`` channels, each a contiguous tensor."""
    return _Split.apply(x, list(sizes))


#: Edges of more channels than this are computed one by one (:func:`stacked_edges`). The
#: block-diagonal 1x1 convolution of ``n`` edges does ``n`` times the work of theirs, which
#: at 32 channels and more catches up with the calls saved. CPU, 2 threads, 4 edges'
#: ``sep_conv_3x3``, forward and backward, stacked against one by one: 5.3x as fast at
#: 32x4x32x32, 2.6x at 32x8x16x16, 1.6x at 32x16x8x8, 0.96x at 32x16x32x32; 1.1x at
#: 32x32x8x8, but 0.85x at 32x32x16x16 and 0.67x at 32x64x8x8.
STACKED_CHANNELS = 16


def _is_depthwise(m: nn.Module) -> bool:
    """A depthwise convolution, one of a single channel included (a plain one)."""
    return (
        isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels
        and m.bias is None and m.padding_mode == "zeros" and not _is_pointwise(m)
    )  # fmt: skip


def _is_pointwise(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
        and m.padding == (0, 0) and m.groups == 1 and m.bias is None
    )  # fmt: skip


def stacked_conv_op(
    ops: Sequence[nn.Sequential],
    relu_x: torch.Tensor,
    scale: torch.Tensor,
    evens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cat[scale_i · ops[i](x)]`` (edge-major) for copies of one SepConv / DilConv /
    ReLUConvBN applied to the same rectified input (``evens``: its even pixels, if at
    hand); ``scale``: one weight per output channel, the edges' weights side by side."""
    n = len(ops)
    bodies = [list(op)[1:] for op in ops]  # without the ReLU: the input is rectified
    y = relu_x
    channel_major = False
    for depth, layer in enumerate(zip(*bodies, strict=True)):
        m, previous = layer[0], bodies[0][depth - 1] if depth else None
        last = depth == len(bodies[0]) - 1
        if _is_depthwise(m) and depth == 0:
            # n filters per input channel: output g * n + i is edge i's channel g
            weight = torch.stack([conv.weight for conv in layer], dim=1).flatten(0, 1)
            y = depthwise(y, weight, m.stride, m.padding, m.dilation, evens=evens)  # type: ignore[arg-type]
            channel_major = n > 1
        elif _is_depthwise(m):
            weight = torch.cat([conv.weight for conv in layer])
            y = depthwise(y, weight, m.stride, m.padding, m.dilation)  # type: ignore[arg-type]
        elif _is_pointwise(m) and depth == 0:
            # every edge's rows read the shared input: the weights stacked, not on a diagonal
            weight = torch.cat([conv.weight.flatten(1) for conv in layer])
            y = F.conv2d(y, weight[:, :, None, None])
        elif _is_pointwise(m):
            weight = torch.block_diag(*(conv.weight.flatten(1) for conv in layer))
            if channel_major:  # columns i * c + g -> g * n + i
                weight = weight.unflatten(1, (n, -1)).transpose(1, 2).flatten(1)
            y = F.conv2d(y, weight[:, :, None, None])
            channel_major = False
        elif depth == 0:
            raise TypeError(f"stacked_conv_op: {ops[0]} does not start with a convolution")
        elif isinstance(m, nn.BatchNorm2d):
            y = scaled_batch_norm(m, y, scale if last else None)
        elif isinstance(m, nn.ReLU) and isinstance(previous, nn.BatchNorm2d):
            y = F.relu_(y)  # the BatchNorm's fresh output: its backward needs its input
        else:
            raise TypeError(f"stacked_conv_op: no stacked form of {type(m).__name__} in {ops[0]}")
        if last and not isinstance(m, nn.BatchNorm2d):
            y = y * scale.reshape(1, -1, 1, 1)
    assert not channel_major, "an op ending in a depthwise convolution"
    return y


def stacked_factorized_reduce(
    ops: Sequence[FactorizedReduce],
    relu_x: torch.Tensor,
    scale: torch.Tensor,
    phases: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``cat[scale_i · ops[i](x)]`` (edge-major) for copies of ``FactorizedReduce`` applied
    to the same rectified input, whose even and odd pixels are ``phases``."""
    weight = torch.cat([
        torch.block_diag(op.conv_1.weight.flatten(1), op.conv_2.weight.flatten(1)) for op in ops
    ])  # fmt: skip
    y = F.conv2d(torch.cat(phases, dim=1), weight[:, :, None, None])
    return scaled_batch_norm(ops[0].bn, y, scale)


def stacked_edges(
    ops: Sequence[nn.ModuleList], shared: SharedInputs, weights: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``Σ_k w_ik · ops[i][k](x)`` for each edge ``i`` leaving the state ``x = shared.x``
    (``ops[i]``: edge ``i``'s primitives; ``weights``: edges x primitives), each its own
    tensor, which no backward function keeps (the caller may add to it in place). Edges
    of more than :data:`STACKED_CHANNELS` channels are computed one by one
    (:func:`~maenas_ray.space.fastpath.mixed_edge`)."""
    n, c = len(ops), shared.x.shape[1]
    if c > STACKED_CHANNELS:
        return tuple(
            mixed_edge(edge, shared, w.unbind(0), w.unsqueeze(-1).expand(-1, c).unbind(0), None)
            for edge, w in zip(ops, weights, strict=True)
        )
    by_op = weights.t()  # primitives x edges
    scalars = by_op.unbind(0)
    vectors = by_op.unsqueeze(-1).expand(-1, -1, c).flatten(1).unbind(0)
    total: torch.Tensor | None = None
    shared_ops: list[tuple[int, torch.Tensor]] = []
    for k, op in enumerate(ops[0]):
        if k == _SKIPPED:
            continue
        if k in _PARAMETER_FREE:
            shared_ops.append((k, shared.pooled(k, op)))
            continue
        if isinstance(op, Identity):
            shared_ops.append((k, shared.x))
            continue
        column = [edge[k] for edge in ops]
        phases = shared.phases() if shared.stride == 2 else None
        if isinstance(op, FactorizedReduce):
            assert phases is not None
            y = stacked_factorized_reduce(column, shared.relu(), vectors[k], phases)  # type: ignore[arg-type]
        elif isinstance(op, nn.Sequential) and isinstance(op[0], nn.ReLU):
            evens = phases[0] if phases else None
            y = stacked_conv_op(column, shared.relu(), vectors[k], evens)  # type: ignore[arg-type]
        else:  # a primitive without a stacked form: op by op
            y = torch.cat([w * m(shared.x) for w, m in zip(scalars[k], column, strict=True)], 1)
        total = y if total is None else total.add_(y)
    if shared_ops:  # Σ_k w_ik · y_k for every edge i: a 1x1 convolution of the y_k
        inputs = torch.cat([y for _, y in shared_ops], dim=1)
        eye = torch.eye(c, dtype=weights.dtype, device=weights.device)
        mix = torch.kron(weights[:, [k for k, _ in shared_ops]], eye)  # [i c + g, t c + g]
        y = F.conv2d(inputs, mix[:, :, None, None])
        total = y if total is None else total.add_(y)
    assert total is not None, "no primitive but the zero op"
    return (total,) if n == 1 else chunks(total, [c] * n)


def edges_by_source(states: int) -> list[list[tuple[int, int]]]:
    """For each state of a cell (its two inputs, then its nodes), the ``(edge, node)`` pairs
    of the edges leaving it, in edge order; node ``i``'s edges are numbered from
    ``Σ_{i' < i} (i' + 2)``, one per state before it."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(states)]
    offset = 0
    for node in range(NODES):
        for j in range(node + 2):
            out[j].append((offset + j, node))
        offset += node + 2
    return out
