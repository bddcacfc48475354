import pytest
import torch

from maenas_ray.space import OPS, PRIMITIVES, build_op


def test_registry_is_the_design_primitive_list():
    assert PRIMITIVES == (
        "none",
        "max_pool_3x3",
        "avg_pool_3x3",
        "skip_connect",
        "sep_conv_3x3",
        "sep_conv_5x5",
        "dil_conv_3x3",
        "dil_conv_5x5",
    )
    assert tuple(OPS) == PRIMITIVES


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", PRIMITIVES)
def test_primitive_forward_backward_shape(name, stride, affine):
    op = build_op(name, 6, stride, affine=affine)
    x = torch.randn(3, 6, 16, 16, requires_grad=True)
    y = op(x)
    assert y.shape == (3, 6, 16 // stride, 16 // stride)
    y.square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    if name == "none":
        assert torch.count_nonzero(y) == 0
    for p in op.parameters():
        assert p.grad is not None


# parameters of each primitive at C=16 (DARTS layer choices); a silent change to an op shows here
PINNED_PARAMS = {
    ("none", 1): 0, ("none", 2): 0,
    ("max_pool_3x3", 1): 0, ("max_pool_3x3", 2): 0,
    ("avg_pool_3x3", 1): 0, ("avg_pool_3x3", 2): 0,
    ("skip_connect", 1): 0, ("skip_connect", 2): 2 * 16 * 8 + 2 * 16,
    ("sep_conv_3x3", 1): 2 * (16 * 9 + 16 * 16 + 2 * 16),
    ("sep_conv_3x3", 2): 2 * (16 * 9 + 16 * 16 + 2 * 16),
    ("sep_conv_5x5", 1): 2 * (16 * 25 + 16 * 16 + 2 * 16),
    ("sep_conv_5x5", 2): 2 * (16 * 25 + 16 * 16 + 2 * 16),
    ("dil_conv_3x3", 1): 16 * 9 + 16 * 16 + 2 * 16,
    ("dil_conv_3x3", 2): 16 * 9 + 16 * 16 + 2 * 16,
    ("dil_conv_5x5", 1): 16 * 25 + 16 * 16 + 2 * 16,
    ("dil_conv_5x5", 2): 16 * 25 + 16 * 16 + 2 * 16,
}  # fmt: skip


@pytest.mark.parametrize(("name", "stride"), sorted(PINNED_PARAMS))
def test_primitive_parameter_count(name, stride):
    op = build_op(name, 16, stride, affine=True)
    assert sum(p.numel() for p in op.parameters()) == PINNED_PARAMS[name, stride]


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'"):
        build_op("conv_9x9", 4, 1)
