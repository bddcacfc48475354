"""The DARTS supernet, used as the encoder of the masked autoencoder."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from maenas_ray.space.cells import CifarStem, ImageNetStem, SearchCell, Stem, reduction_layers
from maenas_ray.space.genotype import NUM_EDGES, Genotype, derive_genotype, node_softmax
from maenas_ray.space.ops import PRIMITIVES
from maenas_ray.space.partial import partial_channels_problem

StemKind = Literal["cifar", "imagenet"]
Formulation = Literal["fast", "reference"]
FORMULATIONS: tuple[str, ...] = ("fast", "reference")


def make_stem(kind: str, channels: int, stem_multiplier: int = 3) -> Stem:
    """The stem of a network of ``channels`` cell channels.

    ``cifar``: one 3x3 conv to ``stem_multiplier * channels``; ``imagenet``: the stride-8
    stem to ``channels``.
    """
    if kind == "cifar":
        return CifarStem(stem_multiplier * channels)
    if kind == "imagenet":
        return ImageNetStem(channels)
    raise ValueError(f"unknown stem {kind!r}; allowed: 'cifar', 'imagenet'")


class Supernet(nn.Module):
    """The DARTS search network without a classifier.

    ``forward(x)`` returns the multi-scale features: the output of the last cell at each
    resolution (1x, 1/2, 1/4 of the stem resolution), finest first. Architecture weights
    (``alphas_normal``, ``alphas_reduce``: ``NUM_EDGES x len(PRIMITIVES)``, initialised at
    ``1e-3 * N(0, 1)``) are kept apart from the network weights: see
    :meth:`arch_parameters` and :meth:`weight_parameters`.

    ``formulation`` picks how the mixed edges are computed, with the same result:
    ``reference`` is the literal ``Σ_k w_k · op_k(x)`` over every primitive on every edge;
    ``fast`` (:mod:`maenas_ray.space.fastpath`) skips the zero op, shares per-state work
    between edges, runs dilated convolutions as plain ones and keeps the activations
    ``channels_last`` (attribute ``channels_last``). Both attributes may be switched on a
    built network.

    ``partial_channels = K > 1`` makes the edges PC-DARTS' partial-channel ones
    (:mod:`maenas_ray.space.partial`; ``K`` must divide ``C``): the mixed ops see ``1/K`` of
    the channels, and edge-normalisation weights ``betas_normal``, ``betas_reduce``
    (``NUM_EDGES`` each, initialised at ``1e-3 * N(0, 1)``) join α as architecture weights
    and in the derivation. ``K = 1`` (the default) is DARTS, without β (the ``betas_*``
    attributes are ``None``).
    """

    def __init__(
        self,
        C: int = 16,  # noqa: N803 (DARTS' name for the cell channels)
        layers: int = 8,
        *,
        stem: StemKind = "cifar",
        stem_multiplier: int = 3,
        formulation: Formulation = "fast",
        partial_channels: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(C, bool) or not isinstance(C, int) or C < 1:
            raise ValueError(f"Supernet C={C!r}; expected a positive integer")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 3:
            raise ValueError(
                f"Supernet layers={layers!r}; expected an integer >= 3 (one cell per resolution)"
            )
        if formulation not in FORMULATIONS:
            raise ValueError(
                f"Supernet formulation={formulation!r}; allowed: {', '.join(FORMULATIONS)}"
            )
        problem = partial_channels_problem(C, partial_channels)
        if problem is not None:
            raise ValueError(f"Supernet partial_channels={partial_channels!r}: {problem}")
        self.C = C
        self.partial_channels = partial_channels
        self.layers = layers
        self.formulation = formulation
        #: run on channels_last activations (the fast path's memory format)
        self.channels_last = formulation == "fast"
        self.stem = make_stem(stem, C, stem_multiplier)
        c_prev_prev, c_prev = self.stem.channels
        reduction_prev = self.stem.reduction_prev
        reductions = reduction_layers(layers)
        c = C
        cells = []
        for i in range(layers):
            reduction = i in reductions
            if reduction:
                c *= 2
            cell = SearchCell(c_prev_prev, c_prev, c, reduction, reduction_prev, partial_channels)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.out_channels
        self.cells = nn.ModuleList(cells)
        # the last cell before each reduction, and the last cell overall
        self.feature_indices = [r - 1 for r in reductions] + [layers - 1]
        self.feature_channels = [cells[i].out_channels for i in self.feature_indices]
        #: downsampling of each feature relative to the input image
        self.feature_strides = [self.stem.stride * 2**k for k in range(len(self.feature_indices))]
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(NUM_EDGES, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(NUM_EDGES, len(PRIMITIVES)))
        self.betas_normal: nn.Parameter | None = None
        self.betas_reduce: nn.Parameter | None = None
        if partial_channels > 1:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(NUM_EDGES))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(NUM_EDGES))

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture weights: α (normal, reduce), then β (normal, reduce) with
        partial channels."""
        betas = [self.betas_normal, self.betas_reduce] if self.partial_channels > 1 else []
        return [self.alphas_normal, self.alphas_reduce, *betas]  # type: ignore[list-item]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture weight."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        w_normal = torch.softmax(self.alphas_normal, dim=-1)
        w_reduce = torch.softmax(self.alphas_reduce, dim=-1)
        fast = self.formulation == "fast"
        e_normal = e_reduce = None
        if self.partial_channels > 1:
            e_normal = node_softmax(self.betas_normal)  # type: ignore[arg-type]
            e_reduce = node_softmax(self.betas_reduce)  # type: ignore[arg-type]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        s0, s1 = self.stem(x)
        features = []
        for i, cell in enumerate(self.cells):
            weights, edge_weights = (w_reduce, e_reduce) if cell.reduction else (w_normal, e_normal)
            s0, s1 = s1, cell(s0, s1, weights, fast=fast, edge_weights=edge_weights)
            if i in self.feature_indices:
                features.append(s1)
        return features

    def genotype(self) -> Genotype:
        """The discrete architecture derived from the current α (DARTS rule), and β with
        partial channels (PC-DARTS: edges ranked by edge weight times op weight)."""
        return derive_genotype(
            self.alphas_normal, self.alphas_reduce, self.betas_normal, self.betas_reduce
        )
