"""The fast formulation of a search edge: the same sums as :class:`MixedOp`, less work.

A mixed edge computes ``Σ_k w_k · op_k(x)`` over every primitive. The reference does that
literally. This path computes the same value and the same gradients with:

- **no ``none`` op**: its output is zero, so it adds nothing and the gradient of its
  weight is ``<dL/dy, 0> = 0``; α still gets its exact gradient through the softmax.
- **shared work per input state**: the ReLU in front of every convolution op, the even
  and odd pixels that stride-2 edges read, and each pooling op with its non-affine
  BatchNorm (no parameters, batch statistics only), depend only on the state and the
  stride, which is the same for every edge leaving a state. They are computed once per
  state instead of once per edge.
- **depthwise backward without the slow kernels** (CPU): oneDNN runs the backward of
  depthwise convolutions up to 3 wide fast and that of 5-wide or dilated ones several
  times slower; :class:`_Depthwise` gets the same gradients from fast kernels only, and a
  stride-2 dilation-2 convolution runs as a plain one on the even pixels it reads.
- **fused weighting**: an op ending in a non-affine BatchNorm gets its edge weight as
  that BatchNorm's affine weight (one kernel, forward and backward); the shared outputs
  are accumulated with ``addcmul_``, the others with ``add_``, in place. The weights are
  split up once per cell (:class:`CellWeights`), not indexed per edge and op.
- **gradients in the layout the kernels want**: the cell output (:func:`concat`) and the
  pixel subsampling (:func:`subsample`) hand back contiguous ``channels_last``
  gradients; a channel slice, or the NCHW tensor a slice's backward makes, sends the
  BatchNorm, add and ReLU kernels that follow down paths several times slower on CPU.
- **narrow BatchNorms on NCHW**: below 8 channels, or 16 with more than one thread
  (PC-DARTS' partial-channel edges), the CPU's channels_last BatchNorm is slower than an
  NCHW copy, normalised, and copied back.

Together with ``channels_last`` tensors (:class:`Supernet` converts its input) this is
what ``Supernet(formulation="fast")`` runs; ``benchmarks/search_step.py`` measures it
against the reference formulation and checks the loss and α gradient agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from maenas_ray.space.ops import NONE_OP, OPS, PRIMITIVES, FactorizedReduce, Identity


def to_phases(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (4B, C, H/2, W/2)``: the four row/column parity sub-images of each
    image, parity-major within the image; keeps ``channels_last``."""
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):  # work on the (B, H, W, C) view
        y = x.permute(0, 2, 3, 1).reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 2, 4, 1, 3, 5)
        return y.reshape(4 * b, h // 2, w // 2, c).permute(0, 3, 1, 2)
    y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(4 * b, c, h // 2, w // 2)


def to_column_phases(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W) -> (2B, C, H, W/2)``: the even columns of every image, then the odd
    ones; keeps ``channels_last``."""
    b, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last):
        y = x.permute(0, 2, 3, 1).reshape(b, h, w // 2, 2, c).permute(3, 0, 1, 2, 4)
        return y.reshape(2 * b, h, w // 2, c).permute(0, 3, 1, 2)
    y = x.reshape(b, c, h, w // 2, 2).permute(4, 0, 1, 2, 3)
    return y.reshape(2 * b, c, h, w // 2)


class _Depthwise(torch.autograd.Function):
    """A stride-1, "same"-padded depthwise convolution (odd kernel, dilation 1 or 2) whose
    backward avoids the slow CPU kernels.

    oneDNN runs the forward of every such convolution fast, but its backward only for 3x3
    undilated kernels: 5-wide or dilated kernels take a generic path several times slower.
    Here the input gradient is the forward convolution of the output gradient with the
    flipped kernel (same padding and dilation). The weight gradient of a dilated kernel is
    that of the plain kernel on the parity sub-images (a dilation-2 convolution only
    combines pixels of one row/column parity); a 5-wide one is taken in column slices:
    the middle three columns as one ``k x 3`` weight gradient, each outer column as a
    ``k x 1`` one on the input shifted by that column's offset.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, dilation: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        pad = dilation * (weight.shape[-1] // 2)
        return F.conv2d(x, weight, padding=pad, dilation=dilation, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            pad = d * (weight.shape[-1] // 2)
            grad_x = F.conv2d(
                grad, weight.flip(2, 3), padding=pad, dilation=d, groups=weight.shape[0]
            )
        if ctx.needs_input_grad[1]:
            if d == 2:
                x, grad = to_phases(x), to_phases(grad.contiguous(memory_format=_format(x)))
            grad_w = _plain_weight_grad(x, grad, weight.shape)
        return grad_x, grad_w, None


class _Concat(torch.autograd.Function):
    """``torch.cat(states, dim=1)`` whose backward hands each state a contiguous gradient
    (in the state's memory format) instead of a channel slice of the output gradient."""

    @staticmethod
    def forward(ctx, *states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes = [s.shape[1] for s in states]
        ctx.formats = [_format(s) for s in states]
        return torch.cat(states, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        chunks = grad.split(ctx.sizes, dim=1)
        return tuple(
            g.contiguous(memory_format=f) for g, f in zip(chunks, ctx.formats, strict=True)
        )


def concat(states: list[torch.Tensor]) -> torch.Tensor:
    """The cell output: its states concatenated along the channels. Their gradients are
    contiguous: a channel slice of a channels_last gradient sends CPU BatchNorm backward
    (the last op of every edge into the last node) down a path ~10x slower."""
    return _Concat.apply(*states)


class _Subsample(torch.autograd.Function):
    """``x[:, :, offset::2, offset::2]`` as a contiguous tensor in ``x``'s memory format.

    Its backward writes the gradient into a zero tensor of ``x``'s shape *and* memory
    format: the native slice backward gives a contiguous (NCHW) one, and adding that to a
    channels_last gradient (or rectifying it) takes CPU kernels several times slower.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: int) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.format, ctx.offset = x.shape, _format(x), offset
        return x[:, :, offset::2, offset::2].contiguous(memory_format=ctx.format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        o = ctx.offset
        full = torch.empty(
            ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.format
        ).zero_()
        full[:, :, o::2, o::2] = grad
        return full, None


def subsample(x: torch.Tensor, offset: int) -> torch.Tensor:
    """The pixels ``(offset + 2i, offset + 2j)`` of ``x``: what a stride-2 1x1 convolution
    reads of ``x`` (offset 0) or of ``x[:, :, 1:, 1:]`` (offset 1)."""
    return _Subsample.apply(x, offset)


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _weight_grad(
    x: torch.Tensor, grad: torch.Tensor, shape: tuple[int, ...], padding: tuple[int, int]
) -> torch.Tensor:
    empty = grad.new_empty(shape)
    return torch.ops.aten.convolution_backward(
        grad, x, empty, None, [1, 1], list(padding), [1, 1], False, [0, 0], shape[0],
        [False, True, False],
    )[1]  # fmt: skip


def _plain_weight_grad(x: torch.Tensor, grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The weight gradient of a stride-1 "same" depthwise convolution without dilation.

    Kernels up to 3 wide are native. A 5-wide one on an even width: the middle three
    columns natively, the outer two (column offsets -2 and +2) as the outer columns of a
    ``k x 3`` weight gradient on the column-parity sub-images, where those offsets are
    -1 and +1. Others: each outer column on a copy of the input shifted by its offset.
    """
    c, _, kh, kw = shape
    if kw <= 3:
        return _weight_grad(x, grad, tuple(shape), (kh // 2, kw // 2))
    if kw == 5 and x.shape[-1] % 2 == 0:
        middle = _weight_grad(x, grad, (c, 1, kh, 3), (kh // 2, 1))
        grad = grad.contiguous(memory_format=_format(x))
        outer = _weight_grad(
            to_column_phases(x), to_column_phases(grad), (c, 1, kh, 3), (kh // 2, 1)
        )
        return torch.cat([outer[..., :1], middle, outer[..., 2:]], dim=3)
    half = kw // 2
    columns: list[torch.Tensor | None] = [None] * kw
    columns[half - 1] = _weight_grad(x, grad, (c, 1, kh, 3), (kh // 2, 1))
    padded = F.pad(x, (half, half, 0, 0))
    width = x.shape[-1]
    for col in [*range(half - 1), *range(half + 2, kw)]:
        shifted = padded[..., col : col + width].contiguous(memory_format=_format(x))
        columns[col] = _weight_grad(shifted, grad, (c, 1, kh, 1), (kh // 2, 0))
    return torch.cat([g for g in columns if g is not None], dim=3)


def depthwise(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    evens: torch.Tensor | None = None,
) -> torch.Tensor:
    """A depthwise convolution without bias: one group per input channel, each with
    ``weight.shape[0] / x.shape[1]`` filters (output channel ``g * m + i`` is filter ``i`` of
    input channel ``g``, ``m`` filters per group). Plain (one filter each) stride-1 "same"
    ones that are 5-wide or dilated go through :class:`_Depthwise` on CPU (outside
    autocast); a stride-2 dilation-2 one reads only the even pixels, so it runs as a
    stride-1 convolution on them (``evens``: ``subsample(x, 0)`` when already at hand)."""
    k, k_w = weight.shape[-2:]
    d = dilation[0]
    same = k == k_w and k % 2 == 1 and tuple(padding) == (d * (k // 2),) * 2
    even = x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0
    if (
        x.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and same
        and tuple(dilation) in ((1, 1), (2, 2))
    ):  # fmt: skip
        if tuple(stride) == (2, 2) and d == 2 and even:  # every tap lands on an even pixel
            x = subsample(x, 0) if evens is None else evens
            return depthwise(x, weight, padding=(k // 2, k // 2))
        plain = weight.shape[0] == x.shape[1]
        if plain and tuple(stride) == (1, 1) and (k > 3 if d == 1 else even):
            return _Depthwise.apply(x, weight, d)
    return F.conv2d(x, weight, None, stride, padding, dilation, groups=x.shape[1])


def _is_depthwise(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1
        and m.bias is None and m.padding_mode == "zeros"
    )  # fmt: skip


class _Layout(torch.autograd.Function):
    """``x`` in another memory format; its gradient goes back in ``x``'s own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:  # type: ignore[override]
        ctx.format = _format(x)
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.contiguous(memory_format=ctx.format), None


#: Below this many channels a CPU BatchNorm runs on an NCHW copy of a channels_last tensor:
#: at 4 channels (PC-DARTS' edges at C=16, K=4) the channels_last kernels take about twice
#: as long as the NCHW ones and the two copies; at 8 they are faster on one thread.
NARROW_BATCH_NORM = 8
#: ... and below this many with more than one thread: the channels_last kernels keep one row
#: of per-channel sums per thread, and rows narrower than a 64-byte cache line share lines
#: between threads. At 8 channels (2 threads) they took 2.6x as long as the NCHW copy path
#: (0.63 ms against 0.24 ms, forward and backward at 32x8x16x16); at 16 they are faster.
NARROW_BATCH_NORM_THREADED = 16


def scaled_batch_norm(
    bn: nn.BatchNorm2d, x: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    """``scale · bn(x)`` (``scale``: a scalar or one value per channel); for a non-affine,
    batch-statistics BatchNorm in one kernel: the weight becomes the BatchNorm's affine
    weight, so neither the product nor its two gradient products are separate passes over
    the tensor. A narrow channels_last one runs on NCHW (:data:`NARROW_BATCH_NORM`,
    :data:`NARROW_BATCH_NORM_THREADED`)."""
    if bn.affine or bn.track_running_stats:
        return bn(x) if scale is None else scale.reshape(1, -1, 1, 1) * bn(x)
    # a materialised weight: torch 2.14's CPU BatchNorm backward gets the input gradient of
    # a channels_last tensor wrong with a stride-0 (expanded) weight
    weight = None if scale is None else scale.expand(x.shape[1]).contiguous()
    threads = torch.get_num_threads()
    narrow = x.device.type == "cpu" and x.shape[1] < (
        NARROW_BATCH_NORM_THREADED if threads > 1 else NARROW_BATCH_NORM
    )
    if narrow and _format(x) == torch.channels_last and not x.is_contiguous():
        y = _Layout.apply(x, torch.contiguous_format)
        y = F.batch_norm(y, None, None, weight, None, training=True, eps=bn.eps)
        return _Layout.apply(y, torch.channels_last)
    return F.batch_norm(x, None, None, weight, None, training=True, eps=bn.eps)


def conv_op(
    op: nn.Sequential,
    relu_x: torch.Tensor,
    scale: torch.Tensor | None = None,
    evens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale ·`` a SepConv / DilConv / ReLUConvBN (``ReLU -> ... -> BN``) applied to an
    already rectified input (``evens``: its even pixels, if at hand; see :func:`depthwise`)."""
    body = list(op)[1:]
    bn = body[-1] if body and isinstance(body[-1], nn.BatchNorm2d) else None
    if bn is not None:
        body.pop()
    previous = None
    for m in body:
        if _is_depthwise(m):
            relu_x = depthwise(
                relu_x, m.weight, m.stride, m.padding, m.dilation,  # type: ignore[arg-type]
                evens=evens if previous is None else None,  # only the op's input has them
            )  # fmt: skip
        elif isinstance(m, nn.ReLU) and isinstance(previous, nn.BatchNorm2d):
            relu_x = F.relu_(relu_x)  # the BatchNorm's fresh output: its backward needs its input
        elif isinstance(m, nn.BatchNorm2d):
            relu_x = scaled_batch_norm(m, relu_x, None)
        else:
            relu_x = m(relu_x)
        previous = m
    if bn is None:
        return relu_x if scale is None else scale.reshape(1, -1, 1, 1) * relu_x
    return scaled_batch_norm(bn, relu_x, scale)


def preprocess(op: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A cell's input preprocessing (ReLUConvBN or FactorizedReduce) by the fast path."""
    if isinstance(op, FactorizedReduce):
        return factorized_reduce(op, F.relu(x))
    if isinstance(op, nn.Sequential) and isinstance(op[0], nn.ReLU):
        return conv_op(op, F.relu(x))
    return op(x)


def factorized_reduce(
    op: FactorizedReduce,
    relu_x: torch.Tensor,
    scale: torch.Tensor | None = None,
    phases: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``scale ·`` a ``FactorizedReduce`` applied to an already rectified input: its two
    stride-2 1x1 convolutions (of the input and of the input less its first row and
    column) as plain ones of the pixels they read (``phases``: ``subsample(relu_x, 0)``
    and ``subsample(relu_x, 1)``, if at hand)."""
    even, odd = phases if phases is not None else (subsample(relu_x, 0), subsample(relu_x, 1))
    halves = [F.conv2d(even, op.conv_1.weight), F.conv2d(odd, op.conv_2.weight)]
    return scaled_batch_norm(op.bn, torch.cat(halves, dim=1), scale)


class SharedInputs:
    """What every edge leaving one state computes alike: the rectified state, its even and
    odd pixels (what stride-2 edges read) and the pooled-and-normalised state, each
    computed on first use."""

    def __init__(self, x: torch.Tensor, stride: int = 1) -> None:
        self.x = x
        self.stride = stride  # of the edges leaving the state
        self._relu: torch.Tensor | None = None
        self._phases: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pooled: dict[int, torch.Tensor] = {}

    def relu(self) -> torch.Tensor:
        if self._relu is None:
            self._relu = F.relu(self.x)
        return self._relu

    def phases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``subsample(relu(x), 0)`` and ``subsample(relu(x), 1)``."""
        if self._phases is None:
            relu_x = self.relu()
            self._phases = subsample(relu_x, 0), subsample(relu_x, 1)
        return self._phases

    def pooled(self, k: int, op: nn.Module) -> torch.Tensor:
        """The output of parameter-free primitive ``k`` (the same on every edge): ``op`` is
        the primitive followed by its BatchNorm."""
        if k not in self._pooled:
            assert isinstance(op, nn.Sequential)  # as MixedOp builds a parameter-free one
            *primitive, bn = op
            assert isinstance(bn, nn.BatchNorm2d)
            y = self.x
            for m in primitive:
                y = m(y)
            self._pooled[k] = scaled_batch_norm(bn, y, None)
        return self._pooled[k]


#: The primitive the fast path leaves out (its output is zero), and the ones whose output
#: is the same on every edge leaving a state.
_SKIPPED = PRIMITIVES.index(NONE_OP)
_PARAMETER_FREE = frozenset(k for k, name in enumerate(PRIMITIVES) if OPS[name].parameter_free)


class CellWeights:
    """A cell's edge weights (``edges x ops``), split up once per forward pass.

    ``scalars[e][k]`` is op ``k``'s weight on edge ``e``; ``vectors[e][k]`` is the same value
    repeated once per channel, a ready BatchNorm weight (:func:`scaled_batch_norm`). Two
    ``unbind`` calls stand in for a ``select`` per edge and op (and an ``expand`` and a copy
    per BatchNorm), whose backward ops would each fill and sum small tensors: thousands of
    tiny operations per step.
    """

    def __init__(self, weights: torch.Tensor, channels: int) -> None:
        self.scalars = [row.unbind(0) for row in weights.unbind(0)]
        vectors = weights.unsqueeze(-1).expand(*weights.shape, channels).contiguous()
        self.vectors = [row.unbind(0) for row in vectors.unbind(0)]


def mixed_edge(
    ops: nn.ModuleList,
    shared: SharedInputs,
    scalars: Sequence[torch.Tensor],
    vectors: Sequence[torch.Tensor],
    total: torch.Tensor | None,
) -> torch.Tensor:
    """``total + Σ_k w_k · ops[k](x)`` (``x = shared.x``) by the fast path, with ``w_k``
    given as ``scalars[k]`` and as a per-channel ``vectors[k]`` (:class:`CellWeights`).

    The sum is accumulated in place: ``total`` must be this pass's own tensor (the result
    of an earlier call, or ``None``), which no backward function keeps.
    """
    for k, op in enumerate(ops):
        if k == _SKIPPED:
            continue
        w = scalars[k]
        if k in _PARAMETER_FREE:  # shared between edges: weighted here
            y = shared.pooled(k, op)
        elif isinstance(op, Identity):
            y = shared.x
        else:  # ops ending in a non-affine BatchNorm: the weight goes into it
            phases = shared.phases() if shared.stride == 2 else None
            if isinstance(op, FactorizedReduce):
                y = factorized_reduce(op, shared.relu(), vectors[k], phases)
            elif isinstance(op, nn.Sequential) and isinstance(op[0], nn.ReLU):
                y = conv_op(op, shared.relu(), vectors[k], phases[0] if phases else None)
            else:  # a primitive this path does not know: run it as it is
                y = w * op(shared.x)
            total = y if total is None else total.add_(y)
            continue
        total = w * y if total is None else total.addcmul_(w, y)
    assert total is not None
    return total
