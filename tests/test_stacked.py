"""The edges leaving one state computed together (maenas_ray/space/stacked.py): each wide
op against the edges' own modules run one by one, in float64, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

import maenas_ray.space.fastpath as fastpath
from maenas_ray.space.cells import MixedOp
from maenas_ray.space.fastpath import SharedInputs, depthwise, scaled_batch_norm
from maenas_ray.space.ops import OPS, PRIMITIVES, FactorizedReduce, ReLUConvBN
from maenas_ray.space.stacked import (
    STACKED_CHANNELS,
    chunks,
    stacked_conv_op,
    stacked_edges,
    stacked_factorized_reduce,
)

CL = torch.channels_last
CONV_OPS = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch_statistics_only(op: torch.nn.Module) -> torch.nn.Module:
    """``op`` in float64 with BatchNorms as in the search: batch statistics only."""
    op = op.double()
    for m in op.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return op


def _search_op(name: str, c: int, stride: int) -> torch.nn.Module:
    return _batch_statistics_only(OPS[name].build(c, stride, False))


def _input(c: int, size: int = 8, batch: int = 3) -> torch.Tensor:
    x = torch.randn(batch, c, size, size, dtype=torch.float64)
    return x.contiguous(memory_format=CL).requires_grad_()


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    probe = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    return torch.autograd.grad((out * probe).sum(), inputs)


def _assert_side_by_side(ours, ops, x, scale, c):
    """``ours`` is ``cat[scale_i · ops[i](x)]`` computed op by op, values and gradients."""
    one_by_one = torch.cat(
        [s.view(1, -1, 1, 1) * op(x) for s, op in zip(scale.split(c), ops, strict=True)], dim=1
    )
    assert ours.shape == one_by_one.shape
    torch.testing.assert_close(ours, one_by_one, rtol=1e-12, atol=1e-12)
    params = [x, scale, *(p for op in ops for p in op.parameters())]
    for a, b in zip(_grads(ours, params), _grads(one_by_one, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CONV_OPS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("n", "c"), [(1, 4), (3, 4), (4, 1), (2, 8)])
def test_a_stacked_conv_op_is_its_edges_ops_side_by_side(name, stride, n, c):
    torch.manual_seed(0)
    ops = [_search_op(name, c, stride) for _ in range(n)]
    x = _input(c)
    scale = torch.rand(n * c, dtype=torch.float64, requires_grad=True)
    evens = fastpath.subsample(F.relu(x), 0) if stride == 2 else None
    ours = stacked_conv_op(ops, F.relu(x), scale, evens)
    assert ours.shape == (3, n * c, 8 // stride, 8 // stride)
    # (a 1-channel input is NCHW as much as channels_last; the convolutions pick NCHW)
    assert ours.is_contiguous(memory_format=CL) or c == 1
    _assert_side_by_side(ours, ops, x, scale, c)


@pytest.mark.parametrize(("n", "c"), [(1, 4), (3, 4), (2, 8)])
def test_a_stacked_relu_conv_bn_stacks_its_1x1_weights_by_rows(n, c):
    """A 1x1 convolution that reads the shared input: every edge reads all its channels
    (a block-diagonal weight would give each edge only its own slice of the input)."""
    torch.manual_seed(0)
    ops = [_batch_statistics_only(ReLUConvBN(c, c, 1, 1, 0, affine=False)) for _ in range(n)]
    x = _input(c)
    scale = torch.rand(n * c, dtype=torch.float64, requires_grad=True)
    _assert_side_by_side(stacked_conv_op(ops, F.relu(x), scale), ops, x, scale, c)


def test_a_stacked_op_must_start_with_a_convolution():
    ops = [torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(4)) for _ in range(2)]
    with pytest.raises(TypeError, match="does not start with a convolution"):
        stacked_conv_op(ops, F.relu(_input(4).float()), torch.ones(8))


def test_a_stacked_factorized_reduce_is_its_edges_ops_side_by_side():
    torch.manual_seed(0)
    ops = [_batch_statistics_only(FactorizedReduce(6, 6, affine=False)) for _ in range(3)]
    x = _input(6)
    scale = torch.rand(18, dtype=torch.float64, requires_grad=True)
    relu_x = F.relu(x)
    phases = fastpath.subsample(relu_x, 0), fastpath.subsample(relu_x, 1)
    _assert_side_by_side(stacked_factorized_reduce(ops, relu_x, scale, phases), ops, x, scale, 6)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("c", [4, STACKED_CHANNELS + 2])  # stacked, and one by one
def test_stacked_edges_are_each_edge_s_mixed_op_and_their_own_tensors(stride, n, c):
    torch.manual_seed(0)
    edges = [_batch_statistics_only(MixedOp(c, stride)) for _ in range(n)]
    x = _input(c)
    weights = torch.randn(n, len(PRIMITIVES), dtype=torch.float64).softmax(-1).requires_grad_()
    ours = stacked_edges([e.ops for e in edges], SharedInputs(x, stride), weights)
    reference = [e(x, w) for e, w in zip(edges, weights, strict=True)]
    assert len(ours) == n
    params = [x, weights, *(p for e in edges for p in e.parameters())]
    for a, b in zip(ours, reference, strict=True):
        assert a.is_contiguous(memory_format=CL)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    expected = _grads(torch.cat(reference, 1), params)
    for a, b in zip(_grads(torch.cat(ours, 1), params), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the caller adds to them in place: no edge's tensor shares memory with another's
    before = [y.detach().clone() for y in ours]
    with torch.no_grad():
        ours[0].add_(1.0)
    for y, old in zip(ours[1:], before[1:], strict=True):
        assert torch.equal(y, old)


def test_a_depthwise_convolution_with_several_filters_per_channel():
    x = _input(3, size=9)
    weight = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    for stride, dilation in [((1, 1), (1, 1)), ((1, 1), (2, 2)), ((2, 2), (1, 1))]:
        pad = (dilation[0] * 2,) * 2
        ours = depthwise(x, weight, stride, pad, dilation)
        expected = F.conv2d(x, weight, None, stride, pad, dilation, groups=3)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t, w: depthwise(t, w, padding=(2, 2)), (x, weight))


def test_chunks_are_copies_with_one_contiguous_gradient():
    x = _input(6)
    parts = chunks(x, [2, 4])
    assert [p.shape[1] for p in parts] == [2, 4]
    assert all(p.is_contiguous(memory_format=CL) for p in parts)
    assert all(p.data_ptr() != x.data_ptr() for p in parts)
    grads = []
    x.register_hook(grads.append)
    torch.cat(parts, 1).mul(2).sum().backward()
    assert grads[0].is_contiguous(memory_format=CL)
    torch.testing.assert_close(grads[0], torch.full_like(x, 2.0))


@pytest.mark.parametrize(("channels", "threads", "copied"), [
    (4, 1, True), (8, 1, False), (8, 2, True), (16, 2, False),
])  # fmt: skip
def test_narrow_batch_norms_run_on_an_nchw_copy_by_thread_count(
    monkeypatch, channels, threads, copied
):
    layouts = []
    original = fastpath._Layout.apply
    monkeypatch.setattr(fastpath._Layout, "apply", lambda x, f: layouts.append(f) or original(x, f))
    torch.set_num_threads(threads)
    bn = torch.nn.BatchNorm2d(channels, affine=False, track_running_stats=False)
    x = torch.randn(2, channels, 5, 6).contiguous(memory_format=CL)
    y = scaled_batch_norm(bn, x, torch.ones(channels))
    assert y.is_contiguous(memory_format=CL)
    assert bool(layouts) == copied
