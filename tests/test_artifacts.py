"""What a search shows of itself: its reconstruction grid under its own masks, and its
reported PSNR in pixels under ``search.norm_pix_loss``.

A sweep's trials search with different mask ratios and patch sizes. Each trial's grid
(``reconstruction.png`` and the TensorBoard image) must show that trial's masks, not the
fixed evaluation masks shared by every trial, and its caption must say which masks they
are. With ``norm_pix_loss`` the model predicts each patch normalised by its own mean and
deviation; ``val_psnr`` and ``eval_psnr`` must still measure the reconstruction in pixels.
"""

import math

import numpy as np
import pytest
import torch

from maenas_ray import viz
from maenas_ray.config import config_from_dict
from maenas_ray.engines import SearchCallback, SearchLoop, run_search
from maenas_ray.mae.masking import patchify, unpatchify


def tiny(**search):
    """A search on 16 x 16 synthetic images small enough for a few seconds on one thread."""
    return config_from_dict(
        {
            "data": {"num_images": 64, "image_size": 16},
            "search": {
                "channels": 4, "layers": 3, "batch_size": 8, "epochs": 1, "steps_per_epoch": 1,
                "eval_images": 8, "decoder_width": 8, "device": "cpu", "hessian_every": 0,
                **search,
            },
        }
    )  # fmt: skip


def zero_patches(images, patch):
    """Per image, which ``patch x patch`` patches are all zero (masked), ``(B, N)``."""
    return (patchify(images, patch) == 0).all(dim=-1)


class Images(SearchCallback):
    def __init__(self):
        self.grids = []

    def on_epoch_end(self, report):
        self.grids.append(report.reconstructions())


# two trials of one sweep: mask ratio 0.25 at patch 4 (4 of 16 patches), 0.75 at patch 2
# (48 of 64); the evaluation masks of both are those of the sweep: ratio 0.5, patch 4
@pytest.mark.parametrize(
    ("ratio", "patch", "hidden", "patches"), [(0.25, 4, 4, 16), (0.75, 2, 48, 64)]
)
def test_a_trials_reconstruction_grid_shows_its_own_masks_and_says_so(
    tmp_path, monkeypatch, ratio, patch, hidden, patches
):
    # the sweep's evaluation masks, shared by its trials (not this trial's)
    cfg = tiny(mask_ratio=ratio, patch_size=patch, eval_mask_ratio=0.5, eval_patch_size=4)
    shown = {}

    def save_reconstruction_grid(path, original, masked, reconstructed, mean, std, **kw):
        shown.update(original=original, masked=masked, mean=mean, std=std, title=kw["title"])
        return real(path, original, masked, reconstructed, mean, std, **kw)

    real = viz.save_reconstruction_grid
    monkeypatch.setattr(viz, "save_reconstruction_grid", save_reconstruction_grid)
    images = Images()
    run_search(cfg, images, out_dir=tmp_path)
    assert (tmp_path / "reconstruction.png").stat().st_size > 10_000
    assert shown["title"] == (
        "epoch 1: original / masked / reconstruction (held-out images; this search's masks: "
        f"ratio {ratio:g}, patch {patch})"
    )
    original, masked = shown["original"], shown["masked"]
    assert original.shape == (8, 3, 16, 16)
    # the masked row hides this search's fraction of its patches, in every image ...
    hidden_patches = zero_patches(masked, patch)
    assert hidden_patches.shape == (8, patches)
    assert hidden_patches.sum(dim=1).tolist() == [hidden] * 8
    assert hidden / patches == ratio
    # ... and shows the rest as they are
    keep = ~hidden_patches.unsqueeze(-1)
    assert torch.equal(patchify(masked, patch) * keep, patchify(original, patch) * keep)
    assert not zero_patches(original, patch).any()  # no patch of an image is zero anyway
    # at patch 4 the hidden 2 x 2 patches come in aligned 4 x 4 blocks; at patch 2 not
    blocks = zero_patches(masked, 2).sum(dim=1)
    if patch == 4:
        assert blocks.tolist() == [4 * hidden] * 8
    else:
        assert zero_patches(masked, 4).sum() < blocks.sum() / 4
    # the TensorBoard image of the epoch is the same grid: rows of 8 tiles, 1-pixel gaps
    (grid,) = images.grids
    assert grid.shape == (3, 3 * 17 + 1, 8 * 17 + 1)
    mean, std = shown["mean"], shown["std"]
    for i in range(8):
        tile = grid[:, 1 + 17 : 1 + 17 + 16, 1 + 17 * i : 1 + 17 * i + 16]
        want = viz.denormalize(masked[i : i + 1], mean, std)[0]
        assert torch.allclose(tile, want, atol=1e-6)


def pixel_psnr(pred, target, mask, patch, mean, std):
    """PSNR (dB) of the masked patches in [0, 1] pixels, the mean squared error averaged per
    patch; ``pred`` and ``target`` normalised images (B, 3, H, W), ``mask`` (B, N)."""
    m, s = np.asarray(mean).reshape(1, 3, 1, 1), np.asarray(std).reshape(1, 3, 1, 1)
    p = np.clip(pred.numpy().astype(np.float64) * s + m, 0.0, 1.0)
    t = target.numpy().astype(np.float64) * s + m
    b, _, h, w = t.shape
    err = ((p - t) ** 2).reshape(b, 3, h // patch, patch, w // patch, patch)
    per_patch = err.mean(axis=(1, 3, 5)).reshape(b, -1)
    return 10 * math.log10(1 / per_patch[mask.numpy()].mean())


def test_under_norm_pix_loss_the_reported_psnr_is_measured_in_pixels():
    """The model's prediction is fixed to 0.9 x each patch of the target normalised by its own
    mean and deviation: in pixels, after undoing that normalisation with the target's
    statistics, an error of a tenth of each patch's contrast (a high PSNR); read as an image
    as it is, a picture of unit-scale noise (a low one)."""
    patch = 4
    cfg = tiny(norm_pix_loss=True, patch_size=patch, mask_ratio=0.5)
    search = SearchLoop(cfg)
    calls = []
    network = search.model.forward

    def forward(x, mask):
        t = patchify(x, patch)
        normalised = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        pred = 0.9 * unpatchify(normalised, patch, 16, 16)
        calls.append((x.detach().clone(), mask.clone(), pred.detach().clone()))
        return network(x, mask) * 0.0 + pred  # the network's graph kept for the α step

    search.model.forward = forward
    metrics = search.run_epoch()
    mean, std = search.data.mean.tolist(), search.data.std.tolist()
    # calls: the α step's A-batch, the weight step's W-batch, then the 8 evaluation images
    (x_a, mask_a, pred_a), _, (x_e, mask_e, pred_e) = calls
    assert torch.equal(mask_e, search.eval_masks()) and x_e.shape[0] == 8
    for name, x, mask, pred in (
        ("val_psnr", x_a, mask_a, pred_a),
        ("eval_psnr", x_e, mask_e, pred_e),
    ):
        t = patchify(x, patch)
        scale = (t.var(-1, keepdim=True) + 1e-6).sqrt()
        in_pixels = unpatchify(
            patchify(pred, patch) * scale + t.mean(-1, keepdim=True), patch, 16, 16
        )
        want = pixel_psnr(in_pixels, x, mask, patch, mean, std)
        as_is = pixel_psnr(pred, x, mask, patch, mean, std)  # the normalised patches as pixels
        assert want > as_is + 15, (name, want, as_is)  # the two differ clearly
        assert metrics[name] == pytest.approx(want, abs=1e-3), name
    # the loss stays in the normalised units: (1 - 0.9)^2 of unit-variance patches
    assert metrics["eval_loss"] == pytest.approx(0.01, rel=0.05)
    assert metrics["val_loss"] == pytest.approx(0.01, rel=0.05)
