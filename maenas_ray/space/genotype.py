"""Genotypes: the discrete cell architecture derived from a search.

One format, one place: a :class:`Genotype` holds, for the normal and the reduction
cell, ``2 * NODES`` edges ``(op, input_index)`` (two per intermediate node) and the
indices of the states concatenated into the cell output. It is stored as JSON::

    {"normal": [["sep_conv_3x3", 0], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [["max_pool_3x3", 0], ...], "reduce_concat": [2, 3, 4, 5]}

States 0 and 1 are the two cell inputs; state ``i + 2`` is intermediate node ``i``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from maenas_ray.space.ops import NONE_OP, PRIMITIVES

#: Intermediate nodes per cell (DARTS: 4).
NODES = 4
#: Edges per cell in the supernet: node i takes every earlier state (2 + 3 + 4 + 5 = 14).
NUM_EDGES = sum(2 + i for i in range(NODES))
#: States concatenated into a cell's output: all intermediate nodes.
DEFAULT_CONCAT: tuple[int, ...] = tuple(range(2, 2 + NODES))

Edge = tuple[str, int]
_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _check_edges(cell: str, edges: Any) -> tuple[Edge, ...]:
    if isinstance(edges, (str, bytes)) or not isinstance(edges, Iterable):
        raise ValueError(f"genotype {cell!r} must be a list of [op, input_index] pairs")
    edges = list(edges)
    if len(edges) != 2 * NODES:
        raise ValueError(
            f"genotype {cell!r} has {len(edges)} edges; a cell has exactly {2 * NODES} "
            f"(2 for each of its {NODES} intermediate nodes)"
        )
    checked = []
    for position, edge in enumerate(edges):
        if isinstance(edge, (str, bytes)) or not isinstance(edge, Sequence) or len(edge) != 2:
            raise ValueError(
                f"genotype {cell!r} edge {position} is {edge!r}; expected an [op, input_index] pair"
            )
        op, index = edge
        if op not in PRIMITIVES or op == NONE_OP:
            allowed = ", ".join(p for p in PRIMITIVES if p != NONE_OP)
            raise ValueError(
                f"genotype {cell!r} edge {position}: unknown op {op!r}; allowed ops are {allowed}"
            )
        node = position // 2
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < node + 2:
            raise ValueError(
                f"genotype {cell!r} edge {position} (node {node}): bad input index {index!r}; "
                f"node {node} can take states 0..{node + 1}"
            )
        checked.append((str(op), int(index)))
    return tuple(checked)


def _check_concat(field: str, concat: Any) -> tuple[int, ...]:
    allowed = range(2, 2 + NODES)
    try:
        values = tuple(concat)
    except TypeError:
        raise ValueError(f"genotype {field!r} must be a list of state indices") from None
    if (
        not values
        or len(set(values)) != len(values)
        or any(isinstance(v, bool) or not isinstance(v, int) or v not in allowed for v in values)
    ):
        raise ValueError(
            f"genotype {field!r} is {list(values)!r}; expected distinct state indices "
            f"from {allowed.start}..{allowed.stop - 1}"
        )
    return values


@dataclass(frozen=True)
class Genotype:
    """A derived architecture. Validated on construction: a bad genotype raises ``ValueError``."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", _check_edges("normal", self.normal))
        object.__setattr__(self, "reduce", _check_edges("reduce", self.reduce))
        object.__setattr__(
            self, "normal_concat", _check_concat("normal_concat", self.normal_concat)
        )
        object.__setattr__(
            self, "reduce_concat", _check_concat("reduce_concat", self.reduce_concat)
        )

    def to_dict(self) -> dict[str, list]:
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Genotype:
        if not isinstance(data, Mapping):
            raise ValueError(
                f"a genotype must be a JSON object with keys {', '.join(_FIELDS)}; "
                f"got {type(data).__name__}"
            )
        missing = [k for k in _FIELDS if k not in data]
        extra = sorted(set(data) - set(_FIELDS))
        if missing or extra:
            problem = f"missing {missing}" if missing else f"unknown {extra}"
            raise ValueError(f"genotype keys: {problem}; expected exactly {', '.join(_FIELDS)}")
        return cls(
            normal=data["normal"],
            normal_concat=data["normal_concat"],
            reduce=data["reduce"],
            reduce_concat=data["reduce_concat"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"genotype JSON is malformed: {err}") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:  # pasteable Python, as in DARTS' genotypes.py
        def edges(es: tuple[Edge, ...]) -> str:
            return "[" + ", ".join(f"({op!r}, {i})" for op, i in es) + "]"

        return (
            f"Genotype(normal={edges(self.normal)}, normal_concat={list(self.normal_concat)}, "
            f"reduce={edges(self.reduce)}, reduce_concat={list(self.reduce_concat)})"
        )

    def count(self, op: str, cell: str = "normal") -> int:
        """How many edges of ``cell`` ('normal' or 'reduce') use ``op``."""
        edges = {"normal": self.normal, "reduce": self.reduce}[cell]
        return sum(1 for name, _ in edges if name == op)

    def summary(self) -> str:
        """One line of op counts per cell, most used first: ``normal 4 sep_conv_3x3 ...``."""

        def cell(edges: tuple[Edge, ...]) -> str:
            names = [op for op, _ in edges]
            ops = sorted(set(names), key=lambda op: (-names.count(op), op))
            return ", ".join(f"{names.count(op)} {op}" for op in ops)

        return f"normal: {cell(self.normal)} | reduce: {cell(self.reduce)}"


def _parse_cell(weights: torch.Tensor) -> list[Edge]:
    """DARTS rule on one cell's softmax weights (NUM_EDGES x len(PRIMITIVES))."""
    rows = weights.tolist()
    none = PRIMITIVES.index(NONE_OP)
    candidates = [k for k in range(len(PRIMITIVES)) if k != none]
    gene: list[Edge] = []
    start = 0
    for node in range(NODES):
        inputs = node + 2
        w = rows[start : start + inputs]
        # strongest non-'none' weight per incoming edge; stable sort: ties -> lower input index
        strength = [max(w[j][k] for k in candidates) for j in range(inputs)]
        best_inputs = sorted(range(inputs), key=lambda j: -strength[j])[:2]
        for j in best_inputs:
            # arg-max over non-'none' ops; ties -> the op registered first
            k_best = max(candidates, key=lambda k: (w[j][k], -k))
            gene.append((PRIMITIVES[k_best], j))
        start += inputs
    return gene


def node_softmax(betas: torch.Tensor) -> torch.Tensor:
    """PC-DARTS' edge normalisation: the softmax of the per-edge β (``NUM_EDGES`` entries, in
    edge order) over the incoming edges of each node, one weight per edge."""
    if betas.shape != (NUM_EDGES,):
        raise ValueError(f"β has shape {tuple(betas.shape)}; expected ({NUM_EDGES},)")
    sizes = [2 + node for node in range(NODES)]
    return torch.cat([torch.softmax(b, dim=0) for b in betas.split(sizes)])


def derive_genotype(
    alphas_normal: torch.Tensor,
    alphas_reduce: torch.Tensor,
    betas_normal: torch.Tensor | None = None,
    betas_reduce: torch.Tensor | None = None,
) -> Genotype:
    """Derive the discrete genotype from architecture logits (DARTS rule).

    ``alphas_*`` are the raw α logits, shape ``(NUM_EDGES, len(PRIMITIVES))``; they are
    turned into per-edge softmax weights first. For each intermediate node the two
    incoming edges with the largest non-``none`` weight are kept, and on each the
    arg-max non-``none`` op. Ties go to the lower input index and to the op that comes
    first in :data:`PRIMITIVES`.

    ``betas_*`` (both or neither): the per-edge logits of PC-DARTS' edge normalisation,
    shape ``(NUM_EDGES,)``. Each edge's op weights are then multiplied by its edge weight
    (:func:`node_softmax`) before the rule above, so an edge's strength is its edge weight
    times its strongest op weight; the op chosen on an edge is the same either way.
    """
    if (betas_normal is None) != (betas_reduce is None):
        raise ValueError("give both betas_normal and betas_reduce, or neither")
    cells = []
    for cell, alphas, betas in (
        ("normal", alphas_normal, betas_normal),
        ("reduce", alphas_reduce, betas_reduce),
    ):
        alphas = torch.as_tensor(alphas).detach().to("cpu", torch.float64)
        if alphas.shape != (NUM_EDGES, len(PRIMITIVES)):
            raise ValueError(
                f"alphas_{cell} has shape {tuple(alphas.shape)}; "
                f"expected ({NUM_EDGES}, {len(PRIMITIVES)})"
            )
        weights = torch.softmax(alphas, dim=-1)
        if betas is not None:
            betas = torch.as_tensor(betas).detach().to("cpu", torch.float64)
            if betas.shape != (NUM_EDGES,):
                raise ValueError(
                    f"betas_{cell} has shape {tuple(betas.shape)}; expected ({NUM_EDGES},)"
                )
            weights = weights * node_softmax(betas).unsqueeze(-1)
        cells.append(_parse_cell(weights))
    return Genotype(tuple(cells[0]), DEFAULT_CONCAT, tuple(cells[1]), DEFAULT_CONCAT)


def _g(normal: list[Edge], reduce: list[Edge]) -> Genotype:
    return Genotype(tuple(normal), DEFAULT_CONCAT, tuple(reduce), DEFAULT_CONCAT)


#: Published genotypes (supervised DARTS-family searches on CIFAR-10).
PUBLISHED: dict[str, Genotype] = {
    "DARTS_V1": _g(
        [
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 2),
        ],
        [
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("avg_pool_3x3", 0),
        ],
    ),
    "DARTS_V2": _g(
        [
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("skip_connect", 0),
            ("dil_conv_3x3", 2),
        ],
        [
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
        ],
    ),
    "PC_DARTS": _g(
        [
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 0),
            ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0),
            ("sep_conv_3x3", 1),
            ("avg_pool_3x3", 0),
            ("dil_conv_3x3", 1),
        ],
        [
            ("sep_conv_5x5", 1),
            ("max_pool_3x3", 0),
            ("sep_conv_5x5", 1),
            ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 3),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 2),
        ],
    ),
}
PUBLISHED["DARTS"] = PUBLISHED["DARTS_V2"]
