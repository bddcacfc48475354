"""The masked autoencoder: a supernet encoder and a decoder."""

from __future__ import annotations

import torch
from torch import nn

from maenas_ray.mae.masking import apply_mask, patch_size_of


class MaskedAutoencoder(nn.Module):
    """Masks the image, encodes it with the supernet, decodes every pixel.

    ``forward(images, mask)`` returns the reconstruction ``(B, 3, H, W)`` in normalised
    space; the patch size is the one at which ``mask`` tiles the image.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        patch_size = patch_size_of(mask, images.shape[-2], images.shape[-1])
        features = self.encoder(apply_mask(images, mask, patch_size))
        return self.decoder(features, output_size=images.shape[-2:])
