import ast
import inspect
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from maenas_ray import viz
from maenas_ray.space import NUM_EDGES, PRIMITIVES, PUBLISHED, Genotype

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path: Path, min_height: int = 100, min_width: int = 100) -> np.ndarray:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert min_height <= height <= 5000 and min_width <= width <= 5000
    return image[..., :3]


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _solid(batch: int, rgb: tuple[float, float, float], size: int = 4) -> torch.Tensor:
    """A batch of single-colour images, in normalised space."""
    pixels = torch.tensor(rgb).view(1, 3, 1, 1).expand(batch, 3, size, size)
    return _normalise(pixels.clone())


def _batch(batch: int, size: int = 8) -> torch.Tensor:
    return _normalise(torch.rand(batch, 3, size, size))


# --------------------------------------------------------------------------- denormalize


def test_denormalize_inverts_normalisation_and_clamps() -> None:
    pixels = torch.rand(2, 3, 5, 5)
    back = viz.denormalize(_normalise(pixels), MEAN, STD)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, pixels, atol=1e-5, rtol=0)

    too_bright = torch.full((3, 2, 2), 10.0)
    too_dark = torch.full((3, 2, 2), -10.0)
    assert torch.all(viz.denormalize(too_bright, MEAN, STD) == 1.0)
    assert torch.all(viz.denormalize(too_dark, MEAN, STD) == 0.0)


def test_denormalize_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 4\)"):
        viz.denormalize(torch.zeros(2, 1, 4, 4), MEAN, STD)


# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_grid_writes_png_and_creates_parent_dirs(tmp_path: Path) -> None:
    x = _batch(3)
    out = viz.save_reconstruction_grid(
        tmp_path / "a" / "b" / "recon.png", x, x * 0.5, x + 0.1, MEAN, STD, title="epoch 3"
    )
    assert out == tmp_path / "a" / "b" / "recon.png"
    assert out.stat().st_size > 0
    _read_png(out)


def test_reconstruction_grid_columns_follow_batch_and_max_images(tmp_path: Path) -> None:
    def width(batch: int, max_images: int) -> int:
        x = _batch(batch)
        path = tmp_path / f"{batch}_{max_images}.png"
        viz.save_reconstruction_grid(path, x, x, x, MEAN, STD, max_images=max_images)
        return _read_png(path).shape[1]

    fewer_than_max = width(2, 8)
    capped = width(10, 4)
    assert fewer_than_max < capped  # 2 columns vs 4
    assert capped == width(4, 4)  # extra images beyond max_images are dropped


def test_reconstruction_grid_accepts_bf16(tmp_path: Path) -> None:
    x = _batch(3).to(torch.bfloat16)
    out = viz.save_reconstruction_grid(tmp_path / "bf16.png", x, x, x, MEAN, STD)
    _read_png(out)


def test_reconstruction_grid_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one shape"):
        viz.save_reconstruction_grid(
            tmp_path / "bad.png", _batch(2), _batch(3), _batch(2), MEAN, STD
        )


def test_reconstruction_grid_rows_are_denormalised_in_order(tmp_path: Path) -> None:
    """Pure red originals, green masked, blue reconstructions: colours land in rows 1, 2, 3."""
    out = viz.save_reconstruction_grid(
        tmp_path / "colours.png",
        _solid(2, (1.0, 0.0, 0.0)),
        _solid(2, (0.0, 1.0, 0.0)),
        _solid(2, (0.0, 0.0, 1.0)),
        MEAN,
        STD,
    )
    image = _read_png(out)
    rows_of = {}
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        others = [c for c in range(3) if c != channel]
        mask = (image[..., channel] > 0.9) & np.all(image[..., others] < 0.1, axis=-1)
        assert mask.sum() > 0.02 * mask.size, f"no {name} tiles in the grid"
        rows_of[name] = np.nonzero(mask)[0]
    assert rows_of["red"].max() < rows_of["green"].min()
    assert rows_of["green"].max() < rows_of["blue"].min()


def test_reconstruction_grid_does_not_leave_the_default_colour(tmp_path: Path) -> None:
    # the normalised value of a mid-grey pixel is ~0; without denormalising it would be black
    grey = _solid(1, (0.5, 0.5, 0.5), size=6)
    image = _read_png(viz.save_reconstruction_grid(tmp_path / "g.png", grey, grey, grey, MEAN, STD))
    mid_grey = np.all(np.abs(image - 0.5) < 0.02, axis=-1)
    assert mid_grey.sum() > 0.05 * mid_grey.size


# --------------------------------------------------------------------------- alphas


def test_reconstruction_tensor_stacks_the_three_rows_for_tensorboard() -> None:
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    rows = [torch.full((8, 3, 16, 16), v) for v in (-2.0, 0.0, 2.0)]  # black, grey, white
    image = viz.reconstruction_tensor(*rows, mean, std)
    assert image.shape == (3, 3 * 16 + 4, 8 * 16 + 9)  # 1-pixel gaps around every image
    assert image.min() >= 0.0 and image.max() <= 1.0
    centres = [float(image[0, 1 + r * 17 + 8, 9]) for r in range(3)]
    assert centres == [0.0, 0.5, 1.0]  # original, masked, reconstruction, top to bottom


def test_edge_labels_follow_supernet_edge_order() -> None:
    labels = viz.edge_labels()
    assert len(labels) == NUM_EDGES
    assert labels[:5] == ["c_{k-2} → 0", "c_{k-1} → 0", "c_{k-2} → 1", "c_{k-1} → 1", "0 → 1"]
    assert labels[-5:] == ["c_{k-2} → 3", "c_{k-1} → 3", "0 → 3", "1 → 3", "2 → 3"]


def test_alpha_heatmaps_write_png(tmp_path: Path) -> None:
    normal = torch.randn(NUM_EDGES, len(PRIMITIVES))
    reduce = torch.randn(NUM_EDGES, len(PRIMITIVES), dtype=torch.bfloat16)
    out = viz.save_alpha_heatmaps(tmp_path / "x" / "alphas.png", normal, reduce, title="t")
    assert out.stat().st_size > 0
    height, width, _ = _read_png(out, min_height=300, min_width=600).shape
    assert width > height  # two heatmaps side by side


def test_alpha_heatmaps_custom_primitives(tmp_path: Path) -> None:
    ops = ["none", "skip_connect", "sep_conv_3x3"]
    a = torch.zeros(NUM_EDGES, len(ops))
    _read_png(viz.save_alpha_heatmaps(tmp_path / "few.png", a, a, primitives=ops))


@pytest.mark.parametrize("bad", ["normal", "reduce"])
def test_alpha_heatmaps_reject_wrong_shape(tmp_path: Path, bad: str) -> None:
    good = torch.zeros(NUM_EDGES, len(PRIMITIVES))
    wrong = torch.zeros(NUM_EDGES - 1, len(PRIMITIVES))
    args = (wrong, good) if bad == "normal" else (good, wrong)
    shape = rf"\({NUM_EDGES - 1}, {len(PRIMITIVES)}\)"
    with pytest.raises(ValueError, match=rf"alphas_{bad} has shape {shape}"):
        viz.save_alpha_heatmaps(tmp_path / "bad.png", *args)
    assert not (tmp_path / "bad.png").exists()


# --------------------------------------------------------------------------- cells


def test_cell_drawings_for_published_genotypes(tmp_path: Path) -> None:
    images = {}
    for name, genotype in PUBLISHED.items():
        out = viz.save_cell_drawings(tmp_path / "cells" / f"{name}.png", genotype, title=name)
        assert out.stat().st_size > 0
        images[name] = _read_png(out, min_height=300, min_width=800)
        height, width, _ = images[name].shape
        assert width > height  # normal and reduce cell side by side
    # the drawing depends on the genotype
    assert not np.array_equal(images["DARTS_V1"], images["PC_DARTS"])


def test_cell_drawing_with_repeated_edges_and_partial_concat(tmp_path: Path) -> None:
    edges = [("sep_conv_3x3", 0), ("skip_connect", 0)] * 2 + [("max_pool_3x3", 2)] * 4
    genotype = Genotype(edges, [4, 5], edges, [2, 3, 4, 5])
    _read_png(viz.save_cell_drawings(tmp_path / "rep.png", genotype))


# --------------------------------------------------------------------------- no global state


def test_module_does_not_use_pyplot() -> None:
    # pyplot keeps global figure state and picks a GUI backend; viz must build Figures directly
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(viz))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    assert imported, "found no imports; the check is broken"
    assert not [name for name in imported if "pyplot" in name or name == "matplotlib.use"]
