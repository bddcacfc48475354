import pytest
import torch

from maenas_ray.mae import DECODERS, HierarchicalDecoder, MaskedAutoencoder, PlainDecoder
from maenas_ray.mae.decoders import build_decoder
from maenas_ray.space import Supernet


def _features(batch=2, size=16, channels=(8, 16, 32), stride=1):
    return [
        torch.randn(batch, c, size // (stride * 2**k), size // (stride * 2**k), requires_grad=True)
        for k, c in enumerate(channels)
    ]


@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_decoder_output_matches_input_shape(name, depth):
    dec = build_decoder(name, [8, 16, 32], width=12, depth=depth)
    out = dec(_features(), output_size=(16, 16))
    assert out.shape == (2, 3, 16, 16)
    blocks = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in dec.modules())
    assert blocks == 2 * depth  # depth blocks after each of the two upsampling steps


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_upsamples_to_the_image_when_the_stem_downsampled(name):
    dec = build_decoder(name, [8, 16, 32], width=8, depth=1)
    out = dec(_features(size=64, stride=8), output_size=(64, 64))
    assert out.shape == (2, 3, 64, 64)


def test_hierarchical_decoder_uses_every_scale_and_plain_only_the_deepest():
    feats = _features()
    HierarchicalDecoder([8, 16, 32], width=8)(feats).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    feats = _features()
    PlainDecoder([8, 16, 32], width=8)(feats).sum().backward()
    assert feats[-1].grad is not None and feats[-1].grad.abs().sum() > 0
    assert feats[0].grad is None and feats[1].grad is None


def test_default_decoder_parameter_count_is_lightweight():
    # C=16 supernet features (64, 128, 256), D=64, depth 1
    dec = HierarchicalDecoder([64, 128, 256], width=64, depth=1)
    n = sum(p.numel() for p in dec.parameters())
    assert n == (256 * 64 + 64) + (128 * 64 + 64) + (64 * 64 + 64) + 2 * (9 * 64 * 64 + 128) + (
        64 * 3 + 3
    )
    assert n == 103_043


def test_unknown_decoder():
    with pytest.raises(ValueError, match="unknown decoder 'unet'; allowed: hierarchical, plain"):
        build_decoder("unet", [8], 8, 1)


def test_gradients_reach_alpha_through_the_reconstruction_loss():
    from maenas_ray.mae import masked_mse, random_patch_mask

    enc = Supernet(4, 3)
    mae = MaskedAutoencoder(enc, HierarchicalDecoder(enc.feature_channels, width=8))
    x = torch.randn(4, 3, 16, 16)
    mask = random_patch_mask(4, 16, 16, 4, 0.5)
    masked_mse(mae(x, mask), x, mask).backward()
    for a in enc.arch_parameters():
        assert a.grad is not None and a.grad.abs().sum() > 0
