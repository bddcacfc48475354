"""Masking and the masked reconstruction loss: small pure functions of tensors
(docs/method.md §1.1).

A mask is a boolean tensor of shape ``(batch, N)`` over the ``N = (H/p)(W/p)``
non-overlapping ``p x p`` patches in row-major order; ``True`` = masked.
"""

from __future__ import annotations

import torch


def num_patches(height: int, width: int, patch_size: int) -> int:
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the image size {height}x{width}")
    return (height // patch_size) * (width // patch_size)


def num_masked(height: int, width: int, patch_size: int, mask_ratio: float) -> int:
    """``round(mask_ratio * N)``: how many patches each sample has masked."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1)")
    return round(mask_ratio * num_patches(height, width, patch_size))


def random_patch_mask(
    batch: int,
    height: int,
    width: int,
    patch_size: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask exactly ``round(mask_ratio * N)`` patches per sample, uniformly at random.

    As MAE does: argsort of uniform noise. The noise is drawn from ``generator`` (on the
    generator's device) and the mask moved to ``device``.
    """
    n = num_patches(height, width, patch_size)
    k = num_masked(height, width, patch_size, mask_ratio)
    gen_device = generator.device if generator is not None else None
    noise = torch.rand(batch, n, generator=generator, device=gen_device)
    masked_ids = noise.argsort(dim=1)[:, :k]
    mask = torch.zeros(batch, n, dtype=torch.bool, device=gen_device)
    mask.scatter_(1, masked_ids, True)
    return mask.to(device) if device is not None else mask


def mask_to_pixels(mask: torch.Tensor, height: int, width: int, patch_size: int) -> torch.Tensor:
    """Expand a patch mask ``(B, N)`` to a pixel mask ``(B, 1, H, W)``."""
    h, w = height // patch_size, width // patch_size
    if mask.shape[1] != h * w:
        raise ValueError(f"mask has {mask.shape[1]} patches; a {height}x{width} image has {h * w}")
    m = mask.view(mask.shape[0], 1, h, 1, w, 1)
    return m.expand(-1, -1, -1, patch_size, -1, patch_size).reshape(mask.shape[0], 1, height, width)


def apply_mask(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Set masked patches to 0 (the dataset mean in normalised space)."""
    pixels = mask_to_pixels(mask, images.shape[-2], images.shape[-1], patch_size)
    return images.masked_fill(pixels, 0.0)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p * p * C)``, patches in row-major order."""
    b, c, height, width = images.shape
    num_patches(height, width, patch_size)
    h, w = height // patch_size, width // patch_size
    x = images.reshape(b, c, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b, n, d = patches.shape
    c = d // (patch_size * patch_size)
    h, w = height // patch_size, width // patch_size
    if n != h * w:
        raise ValueError(f"{n} patches do not tile a {height}x{width} image at patch {patch_size}")
    x = patches.reshape(b, h, w, patch_size, patch_size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def patch_size_of(mask: torch.Tensor, height: int, width: int) -> int:
    """The patch size at which ``mask`` (``(B, N)``) tiles an ``height x width`` image."""
    n = mask.shape[1]
    p = round((height * width / n) ** 0.5) if n else 0
    if p < 1 or (height // p) * (width // p) != n or height % p or width % p:
        raise ValueError(f"a mask of {n} patches does not tile a {height}x{width} image")
    return p


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False
) -> torch.Tensor:
    """Mean squared error over masked pixels only, averaged per masked patch.

    ``pred`` and ``target`` are ``(B, C, H, W)``; ``mask`` is ``(B, N)``, True = masked,
    and fixes the patch size. With ``norm_pix`` the target of each patch is normalised by
    that patch's mean and standard deviation first (MAE's ``norm_pix_loss``). At least float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    patch_size = patch_size_of(mask, pred.shape[-2], pred.shape[-1])
    dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16 -> fp32; fp64 stays
    p = patchify(pred.to(dtype), patch_size)
    t = patchify(target.to(dtype), patch_size)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + 1e-6).sqrt()
    per_patch = (p - t).square().mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()


def unnormalize_patches(pred: torch.Tensor, target: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Undo ``norm_pix_loss`` on a prediction: each patch of ``pred`` (in per-patch
    normalised units) scaled by the deviation and shifted by the mean of the same patch of
    ``target``, as :func:`masked_mse` normalises it; ``(B, C, H, W)`` in, the same out."""
    t = patchify(target.float(), patch_size)
    mean = t.mean(dim=-1, keepdim=True)
    scale = (t.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    p = patchify(pred.float(), patch_size) * scale + mean
    return unpatchify(p, patch_size, pred.shape[-2], pred.shape[-1])


def masked_psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """PSNR (dB) of the masked region in [0, 1] pixel space; ``mean``/``std`` per channel.

    ``pred`` is an image in normalised space: under ``norm_pix_loss`` pass it through
    :func:`unnormalize_patches` first."""
    shape = (1, -1, 1, 1)
    m, s = mean.to(pred.device).view(shape), std.to(pred.device).view(shape)
    p = (pred.float() * s + m).clamp(0.0, 1.0)
    t = target.float() * s + m
    mse = masked_mse(p, t, mask)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
