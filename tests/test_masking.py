import pytest
import torch

from maenas_ray.mae import (
    apply_mask,
    mask_to_pixels,
    masked_mse,
    masked_psnr,
    patchify,
    random_patch_mask,
    unnormalize_patches,
    unpatchify,
)


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("patch", [1, 2, 4, 8])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_mask_count_is_exact(size, patch, ratio):
    n = (size // patch) ** 2
    mask = random_patch_mask(
        7, size, size, patch, ratio, generator=torch.Generator().manual_seed(1)
    )
    assert mask.shape == (7, n) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == round(ratio * n)).all()


def test_masks_differ_per_sample_and_follow_the_generator():
    a = random_patch_mask(16, 32, 32, 4, 0.5, generator=torch.Generator().manual_seed(3))
    b = random_patch_mask(16, 32, 32, 4, 0.5, generator=torch.Generator().manual_seed(3))
    c = random_patch_mask(16, 32, 32, 4, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 16


def test_mask_positions_are_uniform():
    mask = random_patch_mask(20000, 8, 8, 4, 0.5, generator=torch.Generator().manual_seed(0))
    freq = mask.float().mean(dim=0)  # 4 patches, 2 masked each
    assert torch.allclose(freq, torch.full((4,), 0.5), atol=0.02)


def test_bad_mask_arguments():
    with pytest.raises(ValueError, match=r"mask_ratio=1\.0 must be in"):
        random_patch_mask(1, 8, 8, 4, 1.0)
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        random_patch_mask(1, 8, 8, 3, 0.5)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(unpatchify(p, 4, 8, 12), x)
    # patch 1 (row 0, column 1) holds pixels [0:4, 4:8]
    assert torch.equal(p[0, 1].view(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])


def test_apply_mask_zeroes_exactly_the_masked_patches():
    x = torch.randn(2, 3, 8, 8) + 5.0
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    y = apply_mask(x, mask, 4)
    pixels = mask_to_pixels(mask, 8, 8, 4)
    assert pixels.sum() == 3 * 16
    assert (y[pixels.expand_as(y)] == 0).all()
    assert torch.equal(y[~pixels.expand_as(y)], x[~pixels.expand_as(x)])
    assert (y[0, :, :4, 4:] == x[0, :, :4, 4:]).all() and (y[0, :, :4, :4] == 0).all()


def test_masked_mse_ignores_unmasked_pixels():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(4, 3, 16, 16, generator=gen)
    pred = torch.randn(4, 3, 16, 16, generator=gen)
    mask = random_patch_mask(4, 16, 16, 4, 0.5, generator=gen)
    loss = masked_mse(pred, target, mask)
    visible = ~mask_to_pixels(mask, 16, 16, 4).expand_as(pred)
    changed = pred.clone()
    changed[visible] = 1e3
    assert torch.equal(masked_mse(changed, target, mask), loss)
    # but a masked pixel counts
    masked_px = ~visible
    changed[masked_px] += 1.0
    assert masked_mse(changed, target, mask) > loss


def test_masked_mse_is_the_mean_over_masked_patches():
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.zeros(1, 1, 4, 4)
    pred[0, 0, :2, :2] = 2.0  # patch 0 error 4 per pixel
    pred[0, 0, 2:, 2:] = 1.0  # patch 3 error 1 per pixel
    mask = torch.tensor([[True, False, True, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((4 + 0 + 1) / 3)


def test_norm_pix_normalises_each_target_patch():
    target = torch.arange(32.0).view(1, 2, 4, 4)
    mask = torch.ones(1, 4, dtype=torch.bool)
    p = patchify(target, 2)
    normed = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = unpatchify(normed, 2, 4, 4)
    assert masked_mse(pred, target, mask, norm_pix=True).item() == pytest.approx(0, abs=1e-10)
    assert masked_mse(pred, target, mask).item() > 1


def test_masked_psnr():
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    target = torch.zeros(2, 3, 8, 8)
    pred = torch.full((2, 3, 8, 8), 0.4)  # 0.1 error in pixel space -> 20 dB
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert masked_psnr(pred, target, mask, mean, std).item() == pytest.approx(20.0, abs=1e-3)


def test_unnormalize_patches_undoes_norm_pix_on_pixels():
    # a perfect norm_pix prediction, taken back to the image: the target itself, so its
    # PSNR is that of a perfect reconstruction (the normalised values would score ~0 dB)
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=gen) - 0.5  # pixels in [0.375, 0.625] below
    mask = random_patch_mask(2, 8, 8, 4, 0.5, generator=gen)
    p = patchify(target, 4)
    normed = unpatchify(
        (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt(), 4, 8, 8
    )
    assert masked_mse(normed, target, mask, norm_pix=True).item() == pytest.approx(0, abs=1e-8)
    back = unnormalize_patches(normed, target, 4)
    assert torch.allclose(back, target, atol=1e-5)
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    assert masked_psnr(back, target, mask, mean, std) > 80
    assert masked_psnr(normed, target, mask, mean, std) < 20
