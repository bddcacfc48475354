"""Masked autoencoder parts: masking, masked loss, decoders (pure torch)."""

from maenas_ray.mae.decoders import DECODERS, HierarchicalDecoder, PlainDecoder, build_decoder
from maenas_ray.mae.masking import (
    apply_mask,
    mask_to_pixels,
    masked_mse,
    masked_psnr,
    num_masked,
    num_patches,
    patch_size_of,
    patchify,
    random_patch_mask,
    unnormalize_patches,
    unpatchify,
)
from maenas_ray.mae.model import MaskedAutoencoder

__all__ = [
    "DECODERS",
    "HierarchicalDecoder",
    "MaskedAutoencoder",
    "PlainDecoder",
    "apply_mask",
    "build_decoder",
    "mask_to_pixels",
    "masked_mse",
    "masked_psnr",
    "num_masked",
    "num_patches",
    "patch_size_of",
    "patchify",
    "random_patch_mask",
    "unnormalize_patches",
    "unpatchify",
]
