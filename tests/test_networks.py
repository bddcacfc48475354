import pytest
import torch

from maenas_ray.space import PUBLISHED, build_network, count_macs, count_parameters
from maenas_ray.space.cells import drop_path

# Parameter counts of the standard DARTS evaluation networks (auxiliary head excluded).
# DARTS_V2: 3,349,342 on CIFAR-10 (published "3.3M") and 4,718,752 on ImageNet ("4.7M");
# PC-DARTS: 3.63M on CIFAR-10. A change to any op, cell or stem shows up here.
PINNED = {
    ("DARTS_V2", "cifar10"): 3_349_342,
    ("DARTS_V2", "imagenet"): 4_718_752,
    ("DARTS_V2", "cifar100"): 3_401_272,
    ("DARTS_V1", "cifar10"): 3_169_414,
    ("DARTS_V1", "imagenet"): 4_510_432,
    ("PC_DARTS", "cifar10"): 3_634_678,
    ("PC_DARTS", "imagenet"): 5_270_560,
}


@pytest.mark.parametrize(("name", "dataset"), sorted(PINNED))
def test_parameter_counts_match_darts_evaluation_networks(name, dataset):
    model = build_network(PUBLISHED[name], dataset)
    assert count_parameters(model) == PINNED[name, dataset]


def test_auxiliary_head_counted_only_on_request():
    model = build_network(PUBLISHED["DARTS_V2"], "cifar10")
    assert count_parameters(model, exclude_auxiliary=False) == 3_825_768
    no_aux = build_network(PUBLISHED["DARTS_V2"], "cifar10", auxiliary=False)
    assert count_parameters(no_aux, exclude_auxiliary=False) == 3_349_342


def test_network_layout_follows_the_protocols():
    cifar = build_network(PUBLISHED["DARTS_V2"], "cifar10")
    assert len(cifar.cells) == 20 and cifar.aux_index == 13
    assert [i for i, c in enumerate(cifar.cells) if c.reduction] == [6, 13]
    imagenet = build_network(PUBLISHED["DARTS_V2"], "imagenet")
    assert len(imagenet.cells) == 14 and imagenet.stem.stride == 8
    assert imagenet.classifier.out_features == 1000


def test_cifar_style_forward_backward_with_aux_and_drop_path():
    model = build_network(PUBLISHED["DARTS_V2"], "cifar10", channels=8, layers=5, drop_path=0.2)
    x = torch.randn(4, 3, 32, 32)
    logits, aux = model.train()(x)
    assert logits.shape == (4, 10) and aux.shape == (4, 10)
    (logits.sum() + 0.4 * aux.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    logits, aux = model.eval()(x)
    assert logits.shape == (4, 10) and aux is None


def test_imagenet_style_forward():
    model = build_network(PUBLISHED["DARTS_V1"], "imagenet", channels=8, layers=5)
    logits, aux = model.train()(torch.randn(2, 3, 224, 224))
    assert logits.shape == (2, 1000) and aux.shape == (2, 1000)


def test_small_custom_dataset_without_aux():
    model = build_network(
        PUBLISHED["DARTS_V2"], "synthetic", channels=4, layers=3, auxiliary=False,
        num_classes=5, image_size=16,
    )  # fmt: skip
    logits, aux = model.train()(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 5) and aux is None
    logits.sum().backward()


def test_drop_path_zeroes_whole_samples_and_keeps_expectation():
    x = torch.ones(20000, 2, 1, 1)
    y = drop_path(x, 0.25)
    kept = (y[:, 0, 0, 0] > 0).float()
    assert torch.equal(y[:, 0], y[:, 1])  # same decision for every channel of a sample
    assert abs(kept.mean().item() - 0.75) < 0.02
    assert abs(y.mean().item() - 1.0) < 0.03
    assert drop_path(x, 0.0) is x


def test_drop_path_is_only_active_in_training():
    model = build_network(PUBLISHED["DARTS_V2"], "cifar10", channels=4, layers=3,
                          auxiliary=False, drop_path=0.9)  # fmt: skip
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    torch.manual_seed(1)
    a = model(x)[0]
    torch.manual_seed(2)
    b = model(x)[0]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dataset": "svhn"}, r"'svhn' is not one of cifar10, cifar100, imagenet; pass num_classes"),
    ({"dataset": "cifar10", "image_size": 16}, r"auxiliary head needs a larger input"),
    ({"dataset": "cifar10", "channels": 0}, r"channels=0; expected a positive integer"),
    ({"dataset": "cifar10", "layers": 2}, r"layers=2; expected >= 3"),
    ({"dataset": "cifar10", "drop_path": 1.0}, r"drop_path=1.0; expected 0 <= drop_path < 1"),
])  # fmt: skip
def test_build_network_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_network(PUBLISHED["DARTS_V2"], **kwargs)


@pytest.mark.parametrize(
    ("name", "dataset", "macs"),
    [
        ("DARTS_V2", "imagenet", 529_911_552),  # < 600M mobile budget (published 574M)
        ("DARTS_V2", "cifar10", 528_359_040),  # DARTS' CIFAR-10 network, the cited "528M"
        ("DARTS_V1", "imagenet", 505_864_704),
        ("PC_DARTS", "imagenet", 571_137_408),  # published 597M, with other ops counted
    ],
)
def test_multiply_adds_of_published_networks_are_pinned(name, dataset, macs):
    model = build_network(PUBLISHED[name], dataset)
    size = 224 if dataset == "imagenet" else 32
    assert count_macs(model, size) == macs
    assert model.training  # restored after counting in eval mode
    if dataset == "imagenet":
        assert macs < 600_000_000


def test_multiply_adds_count_convolutions_and_linear_layers():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8*3*9 per pixel
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    assert count_macs(model, (4, 6)) == 8 * 3 * 9 * 4 * 6 + 8 * 10
