"""The fast supernet formulation computes what the reference formulation computes."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_search_engine import tiny

from maenas_ray.engines import SearchLoop
from maenas_ray.engines.common import frozen
from maenas_ray.engines.search import load_search_state, save_search_state
from maenas_ray.mae import HierarchicalDecoder, MaskedAutoencoder, masked_mse, random_patch_mask
from maenas_ray.space import Supernet
from maenas_ray.space.fastpath import (
    NARROW_BATCH_NORM,
    _Depthwise,
    _format,
    concat,
    depthwise,
    scaled_batch_norm,
    subsample,
    to_column_phases,
    to_phases,
)

ROOT = Path(__file__).resolve().parent.parent


def _fast_and_reference(stem="cifar", channels=4, layers=5):
    torch.manual_seed(0)
    enc = Supernet(channels, layers, stem=stem)
    with torch.no_grad():  # far from uniform, so that every op weighs differently
        for a in enc.arch_parameters():
            a.normal_()
    fast = MaskedAutoencoder(enc, HierarchicalDecoder(enc.feature_channels, width=8)).double()
    ref = copy.deepcopy(fast)
    ref.encoder.formulation, ref.encoder.channels_last = "reference", False
    return fast, ref


@pytest.mark.parametrize(
    ("stem", "size"),
    [("cifar", 16), ("cifar", 12), ("imagenet", 64)],
    ids=["even-sizes", "odd-last-stage", "imagenet-stem"],
)
def test_fast_and_reference_give_the_same_loss_and_gradients_in_float64(stem, size):
    fast, ref = _fast_and_reference(stem)
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    mask = random_patch_mask(4, size, size, 4, 0.5, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, model in (("fast", fast), ("ref", ref)):
        loss = masked_mse(model(x, mask), x, mask)
        out[name] = loss, torch.autograd.grad(loss, list(model.parameters()))
    (loss_f, grads_f), (loss_r, grads_r) = out["fast"], out["ref"]
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-12, atol=0)
    names = [n for n, _ in fast.named_parameters()]
    assert len(names) == len(grads_f) == len(grads_r)
    for name, a, b in zip(names, grads_f, grads_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13, msg=name)
    # the α gradients are not trivially zero: the comparison means something
    assert all(g.abs().max() > 1e-6 for g in grads_f[:2])


@pytest.mark.parametrize(
    ("k", "d", "size"),
    [
        (5, 1, (8, 10)),  # 5-wide: outer columns on the column-parity sub-images
        (5, 1, (7, 9)),  # odd width: outer columns on shifted copies
        (7, 1, (8, 10)),
        (3, 2, (8, 10)),
        (5, 2, (8, 10)),  # parity sub-images 4x5: odd width
        (5, 2, (8, 12)),  # parity sub-images 4x6: their column-parity sub-images
    ],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_depthwise_backward_is_the_convolution_gradient(k, d, size, channels_last):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(3, 1, k, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _Depthwise.apply(x, w, d), (x, w))
    g = torch.randn(2, 3, *size, dtype=torch.float64)
    ours = torch.autograd.grad(_Depthwise.apply(x, w, d), (x, w), g)
    y = F.conv2d(x, w, padding=d * (k // 2), dilation=d, groups=3)
    native = torch.autograd.grad(y, (x, w), g)
    for a, b in zip(ours, native, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [8, 7])
def test_strided_dilated_depthwise_reads_the_even_pixels(size):
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    ours = depthwise(x, w, stride=(2, 2), padding=(4, 4), dilation=(2, 2))
    native = F.conv2d(x, w, stride=2, padding=4, dilation=2, groups=3)
    torch.testing.assert_close(ours, native)
    g = torch.randn_like(native)
    expected = torch.autograd.grad(native, (x, w), g)
    for a, b in zip(torch.autograd.grad(ours, (x, w), g), expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("size", [(6, 8), (5, 7)])
def test_subsample_reads_one_pixel_parity_and_keeps_the_layout_of_its_gradient(offset, size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    y = subsample(x, offset)
    torch.testing.assert_close(y, x[:, :, offset::2, offset::2], rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: subsample(t, offset), (x,))
    grads = []
    x.register_hook(grads.append)
    subsample(x, offset).sum().backward()
    # a channels_last gradient: the slice backward's NCHW one slows every kernel after it
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


def test_cell_output_hands_its_states_contiguous_gradients():
    states = [
        torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
        for _ in range(3)
    ]
    grads: dict[int, torch.Tensor] = {}
    for k, s in enumerate(states):
        s.register_hook(lambda grad, k=k: grads.__setitem__(k, grad))
    out = concat(states)
    torch.testing.assert_close(out, torch.cat(states, dim=1), rtol=0, atol=0)
    g = torch.randn(2, 12, 6, 6).contiguous(memory_format=torch.channels_last)
    out.backward(g)
    assert sorted(grads) == [0, 1, 2]
    for k, grad in grads.items():
        # not a channel slice of g: CPU BatchNorm backward is ~10x slower on one
        assert grad.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(grad, g[:, 4 * k : 4 * k + 4], rtol=0, atol=0)


@pytest.mark.parametrize("channels", [4, NARROW_BATCH_NORM])  # on an NCHW copy, and not
def test_batch_norm_keeps_the_layout_of_its_output_and_gradient(channels):
    bn = torch.nn.BatchNorm2d(channels, affine=False, track_running_stats=False)
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    scale = torch.rand(channels, dtype=torch.float64, requires_grad=True)
    y = scaled_batch_norm(bn, x, scale)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, scale.view(1, -1, 1, 1) * bn(x), rtol=1e-12, atol=1e-12)
    grads = []
    x.register_hook(grads.append)
    y.backward(torch.randn_like(y))
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t, s: scaled_batch_norm(bn, t, s), (x, scale))
    assert torch.autograd.gradcheck(lambda t: scaled_batch_norm(bn, t, None), (x,))


def test_parity_sub_images():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        p = to_phases(t)
        assert p.shape == (8, 3, 2, 3)
        torch.testing.assert_close(p[1], x[0, :, 0::2, 1::2])  # image 0, even rows, odd columns
        torch.testing.assert_close(p[6], x[1, :, 1::2, 0::2])  # image 1, odd rows, even columns
        c = to_column_phases(t)
        assert c.shape == (4, 3, 4, 3)
        assert c.is_contiguous(memory_format=_format(t))
        torch.testing.assert_close(c[1], x[1, :, :, 0::2])  # even columns of image 1
        torch.testing.assert_close(c[2], x[0, :, :, 1::2])  # odd columns of image 0


def test_formulation_is_checked():
    with pytest.raises(ValueError, match=r"formulation='slow'; allowed: fast, reference"):
        Supernet(4, 3, formulation="slow")  # type: ignore[arg-type]


def test_search_cells_normalise_with_batch_statistics_only():
    keys = Supernet(4, 3).state_dict().keys()
    assert not [k for k in keys if k.startswith("cells.") and "running" in k]
    assert "stem.stem.1.running_mean" in keys  # the affine stem BatchNorm keeps its statistics


def test_checkpoint_with_search_cell_running_statistics_still_resumes(tmp_path):
    cfg = tiny(epochs=1, steps_per_epoch=1)
    state = SearchLoop(cfg).state()
    # as written before the search-cell BatchNorms dropped their running statistics
    state["model"]["encoder.cells.0.edges.0.ops.1.1.running_mean"] = torch.zeros(4)
    state["model"]["encoder.cells.0.edges.0.ops.1.1.num_batches_tracked"] = torch.tensor(3)
    save_search_state(state, tmp_path)
    SearchLoop(cfg).restore(load_search_state(tmp_path))
    state["model"]["encoder.cells.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not fit this search"):
        SearchLoop(cfg).restore(state)


@pytest.mark.parametrize("unrolled", [False, True], ids=["first-order", "second-order"])
def test_search_loops_of_both_formulations_agree(unrolled):
    """The engine's α gradient (first and second order, with its frozen weights or α) is
    the same by either formulation: in float64, to rounding."""
    cfg = tiny(unrolled=unrolled)
    fast, ref = SearchLoop(cfg, formulation="fast"), SearchLoop(cfg, formulation="reference")
    x_w, x_a = next(iter(fast.data.w)), next(iter(fast.data.a))
    mask_a, mask_w = fast.masks()
    for loop in (fast, ref):
        loop.model.double()
    batch = (x_a.double(), mask_a, x_w.double(), mask_w)
    g_fast, loss_fast, _ = fast.alpha_gradients(*batch)
    g_ref, loss_ref, _ = ref.alpha_gradients(*batch)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-12, atol=0)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert b.abs().max() > 1e-6
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # a whole iteration (α step, weight step) leaves every parameter trainable again
    fast.iteration(x_w.double(), x_a.double())
    assert all(p.requires_grad for p in fast.model.parameters())


def test_frozen_restores_requires_grad_after_an_error():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2)]
    with pytest.raises(RuntimeError), frozen(params):
        assert not params[0].requires_grad
        raise RuntimeError
    assert [p.requires_grad for p in params] == [True, False]


def test_search_step_benchmark_prints_the_comparison_and_the_speedup():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "search_step.py"), "--channels", "4",
         "--layers", "3", "--image-size", "16", "--batch", "8", "--repeats", "1"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\d\d", lines[-1])
    assert "same mathematics: yes" in run.stdout
    assert re.search(r"^reference +\d+\.\d +\d+\.\d{3} +\d+\.\d$", run.stdout, re.M)
    assert re.search(r"^fast +\d+\.\d +\d+\.\d{3} +\d+\.\d$", run.stdout, re.M)
