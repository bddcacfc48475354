"""PC-DARTS' partial channel connections (Xu et al., ICLR 2020), an option of the supernet.

With ``partial_channels = K > 1`` a search edge sends only the first ``C/K`` channels of
its input ``x`` through the mixed operation. The other channels bypass it (through a 2x2
max pooling on a stride-2 edge, so that the shapes match), and the two parts, in that
order, are channel-shuffled in ``K`` groups, so that the next edges read other channels::

    edge(x) = shuffle_K(cat[Σ_k w_k · op_k(x[:, :C/K]), bypass(x[:, C/K:])])

With it comes *edge normalisation*: a node sums its incoming edges weighted by the softmax
of a per-edge β over them (:func:`~maenas_ray.space.genotype.node_softmax`), and the
derivation ranks the edges of a node by edge weight times op weight.

The reference formulation computes the edge above literally (:class:`MixedOp
<maenas_ray.space.cells.MixedOp>`). The fast one (:func:`partial_nodes`) uses that the
shuffle and the concatenation only move channels, so the β-weighted sum of a node's edges
can be taken before them, on each part::

    node = shuffle_K(cat[Σ_j Σ_k β_j w_jk · op_jk(head_j), Σ_j β_j · bypass_j])

The mixed sums run on :mod:`~maenas_ray.space.fastpath` with the edge weight folded into
the op weights, the edges leaving a state computed together as one wide op per primitive
(:mod:`~maenas_ray.space.stacked`); a state's head, its bypassed part and that part's
pooling are computed once per state, not once per edge; the split and the shuffle hand
back contiguous gradients in the state's memory format (see
:func:`~maenas_ray.space.fastpath.concat`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maenas_ray.space.fastpath import SharedInputs, _format
from maenas_ray.space.genotype import NODES
from maenas_ray.space.stacked import chunks, edges_by_source, stacked_edges


def partial_channels_problem(channels: int, k: int) -> str | None:
    """Why ``k`` partial channels do not fit a supernet of ``channels`` (its cells have
    ``channels``, twice and four times as many), or ``None`` when they do."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or channels % k:
        cells = ", ".join(str(channels * 2**r) for r in range(3))
        allowed = ", ".join(str(d) for d in range(1, channels + 1) if channels % d == 0)
        return f"must divide the channels of every cell ({cells}); allowed: {allowed}"
    return None


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: channel ``g * (C / groups) + i`` of ``x`` becomes
    channel ``i * groups + g``."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def split_channels(x: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``head`` channels of ``x`` and the others, each contiguous in ``x``'s
    memory format (so is the gradient handed back: see :func:`~maenas_ray.space.stacked.chunks`)."""
    return chunks(x, [head, x.shape[1] - head])  # type: ignore[return-value]


class _Shuffle(torch.autograd.Function):
    """``channel_shuffle(cat[mixed, rest], k)`` written in one pass, in ``mixed``'s memory
    format; the backward hands ``mixed`` and ``rest`` contiguous gradients."""

    @staticmethod
    def forward(ctx, mixed: torch.Tensor, rest: torch.Tensor, k: int) -> torch.Tensor:  # type: ignore[override]
        ctx.k, ctx.formats = k, (_format(mixed), _format(rest))
        b, m, h, w = mixed.shape
        dtype = torch.promote_types(mixed.dtype, rest.dtype)
        # the (B, H, W, C) view: output channel i * k + g is [..., i, g]; group 0 is
        # ``mixed``, group g >= 1 is channels (g - 1) * m ... g * m - 1 of ``rest``
        out = mixed.new_empty((b, h, w, m, k), dtype=dtype)
        out[..., 0] = mixed.permute(0, 2, 3, 1)
        out[..., 1:] = rest.permute(0, 2, 3, 1).unflatten(-1, (k - 1, m)).transpose(-1, -2)
        return out.flatten(-2).permute(0, 3, 1, 2).contiguous(memory_format=ctx.formats[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        k = ctx.k
        g = grad.permute(0, 2, 3, 1).unflatten(-1, (-1, k))  # [..., i, g]
        g_mixed = g[..., 0].contiguous().permute(0, 3, 1, 2)
        g_rest = g[..., 1:].transpose(-1, -2).flatten(-2).contiguous().permute(0, 3, 1, 2)
        return (
            g_mixed.contiguous(memory_format=ctx.formats[0]),
            g_rest.contiguous(memory_format=ctx.formats[1]),
            None,
        )


def shuffle(mixed: torch.Tensor, rest: torch.Tensor, k: int) -> torch.Tensor:
    """``channel_shuffle(torch.cat([mixed, rest], dim=1), k)``, with ``mixed`` the first
    of ``k`` equal groups of channels and ``rest`` the other ``k - 1``."""
    return _Shuffle.apply(mixed, rest, k)


class PartialInputs:
    """A state as the partial-channel edges leaving it read it: its first ``C/k`` channels
    for their mixed ops (with what those compute alike: :class:`SharedInputs`) and the
    other channels, which bypass them (max-pooled 2x2 when the edges have stride 2)."""

    def __init__(self, x: torch.Tensor, k: int, stride: int = 1) -> None:
        head, rest = split_channels(x, x.shape[1] // k)
        self.head = SharedInputs(head, stride)
        self.bypass = rest if stride == 1 else F.max_pool2d(rest, 2)


def partial_nodes(
    edges: nn.ModuleList,
    states: list[torch.Tensor],
    weights: torch.Tensor,
    edge_weights: torch.Tensor,
    k: int,
    stride: int,
) -> list[torch.Tensor]:
    """The intermediate nodes of a search cell with partial-channel edges, by the fast path.

    ``edges``: the cell's :class:`MixedOp` modules, in edge order; ``states``: its two
    preprocessed inputs; ``weights``: softmax(α) (edges x ops); ``edge_weights``: the
    node-wise softmax of β (one per edge); ``stride``: that of the edges from the inputs.
    The edges leaving a state are computed together (:func:`stacked_edges`) as soon as
    the state is known, each added to its node's sum.
    """
    sources = edges_by_source(NODES + 1)  # the last node feeds no edge of this cell
    order = [e for leaving in sources for e, _ in leaving]
    folded = (weights * edge_weights.unsqueeze(-1))[order].split([len(s) for s in sources])
    betas = edge_weights.unbind(0)
    mixed: list[torch.Tensor | None] = [None] * NODES
    rest: list[torch.Tensor | None] = [None] * NODES
    nodes: list[torch.Tensor] = []
    for j, leaving in enumerate(sources):
        if j < 2:
            state = PartialInputs(states[j], k, stride)
        else:  # every edge into node j - 2 is in
            nodes.append(shuffle(mixed[j - 2], rest[j - 2], k))  # type: ignore[arg-type]
            state = PartialInputs(nodes[-1], k)
        ops: list[nn.ModuleList] = [edges[e].ops for e, _ in leaving]  # type: ignore[misc]
        for (e, node), y in zip(leaving, stacked_edges(ops, state.head, folded[j]), strict=True):
            previous = mixed[node]
            mixed[node] = y if previous is None else previous.add_(y)
            b, bypass = betas[e], state.bypass
            previous = rest[node]
            rest[node] = b * bypass if previous is None else previous.addcmul_(b, bypass)
    nodes.append(shuffle(mixed[-1], rest[-1], k))  # type: ignore[arg-type]
    return nodes
