import pytest
import torch

from maenas_ray.space import NUM_EDGES, PRIMITIVES, Supernet


def test_tiny_supernet_multiscale_features_and_backward():
    net = Supernet(C=4, layers=5)
    x = torch.randn(2, 3, 16, 16)
    feats = net(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]
    assert net.feature_channels == [16, 32, 64]
    assert net.feature_strides == [1, 2, 4]
    sum(f.square().mean() for f in feats).backward()
    for p in net.arch_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.weight_parameters())


def test_arch_and_weight_parameters_partition_parameters():
    net = Supernet(C=4, layers=5)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert arch.isdisjoint(weights)
    assert arch | weights == {id(p) for p in net.parameters()}
    assert [tuple(p.shape) for p in net.arch_parameters()] == [(NUM_EDGES, len(PRIMITIVES))] * 2


def test_alphas_initialised_small():
    net = Supernet(C=4, layers=3)
    a = torch.cat([p.flatten() for p in net.arch_parameters()])
    assert 0 < a.abs().max() < 1e-2
    assert 5e-4 < a.std() < 2e-3


def test_paper_size_supernet_parameter_count():
    # DARTS' search network (C=16, 8 cells) has 1,930,618 parameters including its
    # 256 -> 10 classifier (2,570); the MAE encoder has no classifier.
    net = Supernet(C=16, layers=8)
    assert sum(p.numel() for p in net.weight_parameters()) == 1_930_618 - 2_570
    assert net.feature_channels == [64, 128, 256]
    assert net.feature_indices == [1, 4, 7]


def test_imagenet_stem_supernet_strides():
    net = Supernet(C=4, layers=3, stem="imagenet")
    feats = net(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 8), (4, 4), (2, 2)]
    assert net.feature_strides == [8, 16, 32]


def test_genotype_follows_alphas():
    net = Supernet(C=4, layers=3)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, PRIMITIVES.index("skip_connect")] = 5.0
    assert net.genotype().count("skip_connect") == 8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": 2}, r"layers=2; expected an integer >= 3"),
    ({"C": 0}, r"C=0; expected a positive integer"),
    ({"stem": "resnet"}, r"unknown stem 'resnet'"),
])  # fmt: skip
def test_bad_supernet_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Supernet(**kwargs)
