"""Pictures to look at after a search, written as PNG files.

* :func:`save_reconstruction_grid` -- original / masked / reconstructed images in a
  3-row grid, as in Figure 2 of the MAE paper;
* :func:`save_alpha_heatmaps` -- softmax(α) of the normal and the reduction cell;
* :func:`save_cell_drawings` -- the derived normal and reduction cells as graphs (the
  DARTS ``plot`` pictures, drawn with matplotlib instead of graphviz).

Every function builds its own :class:`matplotlib.figure.Figure` on the Agg canvas, so
nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from maenas_ray.space.genotype import NODES, NUM_EDGES, Genotype
from maenas_ray.space.ops import PRIMITIVES

__all__ = [
    "denormalize",
    "edge_labels",
    "new_figure",
    "save_alpha_heatmaps",
    "save_cell_drawings",
    "save_figure",
    "save_reconstruction_grid",
    "state_name",
]

PathLike = str | os.PathLike

_ROW_NAMES = ("original", "masked", "reconstruction")


def new_figure(
    figsize: tuple[float, float],
    layout: Literal["constrained", "compressed", "tight"] | None = "constrained",
) -> Figure:
    """A figure on its own Agg canvas (no pyplot, no display)."""
    fig = Figure(figsize=figsize, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as a PNG on a white background, creating the parent directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", facecolor="white")
    return out


def state_name(state: int) -> str:
    """Name of cell state ``state``: 0, 1 are the inputs, ``i + 2`` is intermediate node ``i``."""
    return {0: "c_{k-2}", 1: "c_{k-1}"}.get(state, str(state - 2))


def edge_labels() -> list[str]:
    """Row labels of an α matrix in supernet edge order, e.g. ``"c_{k-2} → 0"``."""
    return [f"{state_name(j)} → {i}" for i in range(NODES) for j in range(i + 2)]


# --------------------------------------------------------------------------- images


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``(pixel / 255 - mean) / std`` on a (..., C, H, W) tensor; float32 CPU in [0, 1]."""
    x = x.detach().float().cpu()
    if len(mean) != len(std) or x.dim() < 3 or x.shape[-3] != len(mean):
        raise ValueError(
            f"cannot denormalise a tensor of shape {tuple(x.shape)} with {len(mean)} means and "
            f"{len(std)} stds; expected (..., C, H, W) with C = len(mean) = len(std)"
        )
    m = torch.tensor([float(v) for v in mean]).view(-1, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(-1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def reconstruction_tensor(
    original: torch.Tensor,
    masked: torch.Tensor,
    reconstructed: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """The three rows of :func:`save_reconstruction_grid` as one image (3, H, W) in [0, 1]
    (TensorBoard's ``add_image``), 1-pixel white gaps between the images."""
    from torchvision.utils import make_grid

    rows = [denormalize(t, mean, std) for t in (original, masked, reconstructed)]
    return make_grid(torch.cat(rows), nrow=original.shape[0], padding=1, pad_value=1.0)


def save_reconstruction_grid(
    path: PathLike,
    original: torch.Tensor,
    masked: torch.Tensor,
    reconstructed: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    max_images: int = 8,
    *,
    title: str | None = None,
) -> Path:
    """Save a 3-row grid (original / masked / reconstruction) of up to ``max_images`` images.

    The tensors are (B, 3, H, W) in normalised space, on any device and of any float dtype.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1; got {max_images}")
    rows = [original, masked, reconstructed]
    shapes = {tuple(t.shape) for t in rows}
    if len(shapes) != 1 or original.dim() != 4 or original.shape[0] == 0:
        raise ValueError(
            "original, masked and reconstructed must be non-empty (B, C, H, W) tensors of one "
            f"shape; got {', '.join(str(tuple(t.shape)) for t in rows)}"
        )
    n = min(original.shape[0], max_images)
    images = [denormalize(t[:n], mean, std).permute(0, 2, 3, 1).numpy() for t in rows]

    height, width = original.shape[-2:]
    tile = 1.6
    aspect = height / width
    fig = new_figure((tile * n + 0.6, tile * aspect * 3 + (0.5 if title else 0.1)))
    axes = fig.subplots(3, n, squeeze=False)
    for r, (name, batch) in enumerate(zip(_ROW_NAMES, images, strict=True)):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(batch[c], vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=11)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- alphas


def save_alpha_heatmaps(
    path: PathLike,
    alphas_normal: torch.Tensor,
    alphas_reduce: torch.Tensor,
    primitives: Sequence[str] = PRIMITIVES,
    *,
    title: str | None = None,
) -> Path:
    """Save softmax(α) of the normal and the reduction cell as two annotated heatmaps.

    ``alphas_*`` are raw logits of shape ``(14, len(primitives))``.
    """
    primitives = list(primitives)
    weights = []
    for name, alphas in (("alphas_normal", alphas_normal), ("alphas_reduce", alphas_reduce)):
        a = torch.as_tensor(alphas).detach().float().cpu()
        if tuple(a.shape) != (NUM_EDGES, len(primitives)):
            raise ValueError(
                f"{name} has shape {tuple(a.shape)}; expected ({NUM_EDGES}, {len(primitives)})"
            )
        weights.append(torch.softmax(a, dim=-1).numpy())
    vmax = max(float(w.max()) for w in weights)

    fig = new_figure((2.0 + 1.5 * len(primitives), 7.2 if title else 6.8))
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, w, cell in zip(axes, weights, ("normal cell", "reduce cell"), strict=True):
        image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        ax.set_title(cell)
        ax.set_xticks(range(len(primitives)), primitives, rotation=45, ha="right", fontsize=9)
        ax.set_yticks(range(NUM_EDGES), edge_labels(), fontsize=9)
        for row in range(w.shape[0]):
            for col in range(w.shape[1]):
                value = float(w[row, col])
                colour = "black" if vmax > 0 and value / vmax > 0.6 else "white"
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, c=colour)
        # thin separators between the intermediate nodes' edge groups
        start = 0
        for node in range(NODES - 1):
            start += node + 2
            ax.axhline(start - 0.5, color="white", linewidth=1.5)
    assert image is not None  # two cells, two images
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="softmax(α)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- cells

_BOX_W, _BOX_H = 1.0, 0.5
_INPUT_COLOUR = "#b4eeb4"  # DARTS' darkseagreen2
_NODE_COLOUR = "#add8e6"  # lightblue
_OUTPUT_COLOUR = "#eee8aa"  # palegoldenrod


def _node_positions() -> dict[str | int, tuple[float, float]]:
    """Layout: inputs on the left, intermediate nodes along an arch, output on the right.

    The boxes sit on a convex curve, so no straight edge between two of them crosses a third.
    """
    pos: dict[str | int, tuple[float, float]] = {1: (0.0, 0.0), 0: (0.4, 2.7)}
    arch = [(2.2, 4.2), (4.5, 4.8), (6.8, 4.2), (8.6, 2.7)]
    for i in range(NODES):
        pos[i + 2] = arch[i]
    pos["out"] = (9.0, 0.0)
    return pos


def _op_colours() -> dict[str, tuple[float, float, float]]:
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    return {op: to_rgb(palette[k % len(palette)]) for k, op in enumerate(PRIMITIVES)}


def _draw_cell(
    ax: Axes, edges: Sequence[tuple[str, int]], concat: Sequence[int], name: str
) -> None:
    pos = _node_positions()
    labels: dict[str | int, str] = {s: state_name(s) for s in range(NODES + 2)}
    labels["out"] = "c_{k}"
    patches = {}
    for key, (x, y) in pos.items():
        colour = (
            _INPUT_COLOUR if key in (0, 1) else _OUTPUT_COLOUR if key == "out" else _NODE_COLOUR
        )
        patch = FancyBboxPatch(
            (x - _BOX_W / 2, y - _BOX_H / 2),
            _BOX_W,
            _BOX_H,
            boxstyle="round,pad=0.05",
            facecolor=colour,
            edgecolor="black",
            linewidth=1.2,
            zorder=3,
        )
        ax.add_patch(patch)
        ax.text(x, y, labels[key], ha="center", va="center", fontsize=11, zorder=4)
        patches[key] = patch

    colours = _op_colours()
    seen: dict[tuple[int, int], int] = {}
    for position, (op, src) in enumerate(edges):
        dst = position // 2 + 2
        # Every edge runs clockwise along the convex layout, so a positive rad bends it into
        # the interior, away from the other boxes; a repeated edge bends further in.
        repeat = seen.get((src, dst), 0)
        seen[(src, dst)] = repeat + 1
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        length = ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5
        rad = 0.1 + repeat * max(0.25, 0.9 / length)  # labels of repeats >= 0.45 apart
        arrow = FancyArrowPatch(
            (x1, y1),
            (x2, y2),
            patchA=patches[src],
            patchB=patches[dst],
            arrowstyle="-|>",
            mutation_scale=14,
            connectionstyle=f"arc3,rad={rad}",
            color=colours.get(op, (0.2, 0.2, 0.2)),
            linewidth=1.6,
            zorder=2,
        )
        ax.add_patch(arrow)
        # midpoint of arc3's quadratic Bézier (equal aspect, so data coords work)
        lx = (x1 + x2) / 2 + 0.5 * rad * (y2 - y1)
        ly = (y1 + y2) / 2 - 0.5 * rad * (x2 - x1)
        ax.text(
            lx,
            ly,
            op,
            ha="center",
            va="center",
            fontsize=8,
            color=colours.get(op, (0.2, 0.2, 0.2)),
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none"},
            zorder=5,
        )
    for state in concat:
        ax.add_patch(
            FancyArrowPatch(
                pos[state],
                pos["out"],
                patchA=patches[state],
                patchB=patches["out"],
                arrowstyle="-|>",
                mutation_scale=12,
                connectionstyle="arc3,rad=-0.1",
                color="0.55",
                linewidth=1.0,
                linestyle="--",
                zorder=1,
            )
        )
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title(name, fontsize=13)


def save_cell_drawings(path: PathLike, genotype: Genotype, *, title: str | None = None) -> Path:
    """Save drawings of the genotype's normal and reduction cell side by side."""
    fig = new_figure((16.0, 5.4 if title else 5.0))
    axes = fig.subplots(1, 2)
    _draw_cell(axes[0], genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(axes[1], genotype.reduce, genotype.reduce_concat, "reduce cell")
    if title:
        fig.suptitle(title, fontsize=14)
    return save_figure(fig, path)
