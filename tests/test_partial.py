"""PC-DARTS partial channel connections: the supernet option, checked against PC-DARTS'
formulation written out literally, and K = 1 against DARTS."""

import copy
import importlib.util
import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_search_engine import tiny

from maenas_ray.engines import SearchLoop
from maenas_ray.space import NUM_EDGES, PRIMITIVES, Supernet
from maenas_ray.space.partial import channel_shuffle, shuffle, split_channels


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny tensors gain nothing from a second thread, and wait long for it when the
    other core is busy (several times the run time on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def literal_pc_darts(net: Supernet, x: torch.Tensor) -> list[torch.Tensor]:
    """PC-DARTS' search network (its model_search.py: MixedOp, Cell) written out edge by
    edge on the supernet's own modules: the first C/K channels of each edge's input through
    its ops, the rest past them (2x2 max-pooled on a stride-2 edge), concatenated and
    shuffled; each node the sum of its edges weighted by the softmax of their β."""
    k = net.partial_channels
    s0, s1 = net.stem(x)
    features = []
    for i, cell in enumerate(net.cells):
        kind = "reduce" if cell.reduction else "normal"
        alphas, betas = getattr(net, f"alphas_{kind}"), getattr(net, f"betas_{kind}")
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        e = 0
        for _node in range(4):
            edge_weights = torch.softmax(betas[e : e + len(states)], dim=0)
            total = 0
            for j, h in enumerate(states):
                c = h.shape[1]
                op_weights, ops = torch.softmax(alphas[e], dim=0), cell.edges[e].ops
                part, rest = h[:, : c // k], h[:, c // k :]
                mixed = sum(w * op(part) for w, op in zip(op_weights, ops, strict=True))
                if mixed.shape[-1] < h.shape[-1]:  # a stride-2 edge
                    rest = F.max_pool2d(rest, kernel_size=2, stride=2)
                y = torch.cat([mixed, rest], dim=1)
                # shuffle in k groups: output channel i * k + g is channel g * (c / k) + i
                order = [g * (c // k) + i for i in range(c // k) for g in range(k)]
                total = total + edge_weights[j] * y[:, order]
                e += 1
            states.append(total)
        s0, s1 = s1, torch.cat(states[2:], dim=1)
        if i in net.feature_indices:
            features.append(s1)
    return features


def _loss_and_gradients(net, forward, x):
    features = forward(x)
    gen = torch.Generator().manual_seed(1)
    loss = sum((f * torch.randn(f.shape, generator=gen, dtype=f.dtype)).sum() for f in features)
    return features, loss, torch.autograd.grad(loss, list(net.parameters()))


@pytest.mark.parametrize("formulation", ["fast", "reference"])
@pytest.mark.parametrize(
    ("channels", "k"), [(4, 2), (8, 4), (4, 4)], ids=["C4-K2", "C8-K4", "C4-K4"]
)
def test_partial_channel_supernet_is_pc_darts_in_float64(formulation, channels, k):
    # 4 cells: normal, reduce, reduce (after a reduction), normal (after a reduction)
    torch.manual_seed(0)
    net = Supernet(channels, 4, formulation=formulation, partial_channels=k).double()
    with torch.no_grad():  # far from uniform, so that every op and edge weighs differently
        for a in net.arch_parameters():
            a.normal_()
    literal = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = _loss_and_gradients(net, net, x)
    expected = _loss_and_gradients(literal, lambda x: literal_pc_darts(literal, x), x)
    assert [tuple(f.shape) for f in ours[0]] == [
        (2, 4 * channels, 8, 8), (2, 8 * channels, 4, 4), (2, 16 * channels, 2, 2),
    ]  # fmt: skip
    for a, b in zip(ours[0], expected[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], expected[1], rtol=1e-12, atol=0)
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    for name, a, b in zip(names, ours[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    # α and β get real gradients: the comparison means something
    assert all(g.abs().max() > 1e-6 for g in ours[2][:4])


@pytest.mark.parametrize("formulation", ["fast", "reference"])
def test_one_partial_channel_is_darts_bit_for_bit(formulation):
    nets = []
    for kwargs in ({}, {"partial_channels": 1}):
        torch.manual_seed(0)
        net = Supernet(4, 4, formulation=formulation, **kwargs).double()
        with torch.no_grad():
            for a in net.arch_parameters():
                a.normal_()
        nets.append(net)
    plain, k1 = nets
    assert k1.betas_normal is None and k1.betas_reduce is None
    assert len(k1.arch_parameters()) == 2
    assert plain.state_dict().keys() == k1.state_dict().keys()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (_, loss_a, grads_a), (_, loss_b, grads_b) = (_loss_and_gradients(n, n, x) for n in nets)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    # and DARTS as computed before the option existed (this seed, input and loss)
    assert loss_a.item() == pytest.approx(-91.354786677969, rel=1e-10)
    sums = [g.abs().sum().item() for g in grads_a[:2]]
    assert sums == pytest.approx([2093.04298967, 1970.19317422], rel=1e-10)


def test_shuffle_interleaves_the_mixed_and_the_bypassed_channels():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    mixed, rest = torch.randn(2, 3, 4, 5), torch.randn(2, 9, 4, 5)
    for fmt in (torch.contiguous_format, torch.channels_last):
        m, r = mixed.contiguous(memory_format=fmt), rest.contiguous(memory_format=fmt)
        out = shuffle(m, r, 4)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, channel_shuffle(torch.cat([m, r], 1), 4), rtol=0, atol=0)


def test_split_and_shuffle_gradients_are_exact_and_contiguous():
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: split_channels(t, 2), (x,))
    m = torch.randn(2, 2, 4, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 6, 4, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    m.requires_grad_(), r.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: shuffle(a, b, 4), (m, r))
    grads = {}
    for name, t in (("x", x), ("m", m), ("r", r)):
        t.register_hook(lambda g, name=name: grads.__setitem__(name, g))
    head, rest = split_channels(x, 2)
    (shuffle(head * m, rest * r, 4) * torch.randn(2, 8, 4, 6, dtype=torch.float64)).sum().backward()
    assert sorted(grads) == ["m", "r", "x"]
    # channels_last gradients: CPU BatchNorm and ReLU backward are slower on NCHW slices
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads.values())


def test_partial_channel_supernet_parameters_and_betas():
    # PC-DARTS' search network at the paper size (C=16, 8 cells, K=4): an edge's ops have
    # 102c + 6c^2 weights at c channels (+ c^2 for a stride-2 skip's FactorizedReduce), at
    # c = 4, 8, 16 instead of 16, 32, 64: 1,831,168 edge weights become 200,128; the other
    # 96,880 (stem, preprocessing) stay.
    net = Supernet(C=16, layers=8, partial_channels=4)
    assert sum(p.numel() for p in net.weight_parameters()) == 297_008
    assert [tuple(p.shape) for p in net.arch_parameters()] == [
        (NUM_EDGES, len(PRIMITIVES)), (NUM_EDGES, len(PRIMITIVES)), (NUM_EDGES,), (NUM_EDGES,),
    ]  # fmt: skip
    betas = torch.cat([net.betas_normal, net.betas_reduce])
    assert 0 < betas.abs().max() < 1e-2
    arch = {id(p) for p in net.arch_parameters()}
    assert arch.isdisjoint(id(p) for p in net.weight_parameters())
    assert net.feature_channels == [64, 128, 256]


def test_genotype_follows_betas():
    net = Supernet(C=4, layers=3, partial_channels=2)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, PRIMITIVES.index("skip_connect")] = 5.0
        net.betas_normal.zero_()
        net.betas_normal[[1, 3, 6, 10]] = 4.0  # into every node, the edge from state 1
    g = net.genotype()
    assert [j for _, j in g.normal[::2]] == [1, 1, 1, 1]
    assert g.count("skip_connect") == 8


@pytest.mark.parametrize("k", [3, 0, 8])
def test_partial_channels_must_divide_every_cell(k):
    with pytest.raises(
        ValueError,
        match=rf"partial_channels={k}: must divide the channels of every cell \(4, 8, 16\); "
        r"allowed: 1, 2, 4$",
    ):
        Supernet(4, 3, partial_channels=k)


def test_search_loop_trains_betas_as_architecture_weights():
    loop = SearchLoop(tiny(partial_channels=2, unrolled=True))  # β in the second-order step
    enc = loop.model.encoder
    assert loop.arch_names == [
        "encoder.alphas_normal", "encoder.alphas_reduce",
        "encoder.betas_normal", "encoder.betas_reduce",
    ]  # fmt: skip
    assert [id(p) for p in loop.a_opt.param_groups[0]["params"]] == [
        id(p) for p in enc.arch_parameters()
    ]
    assert not {id(p) for p in loop.weights} & {id(p) for p in enc.arch_parameters()}
    before = [p.detach().clone() for p in enc.arch_parameters()]
    loop.iteration(next(iter(loop.data.w)), next(iter(loop.data.a)))
    assert all(not torch.equal(a, b) for a, b in zip(before, enc.arch_parameters(), strict=True))


def test_search_step_benchmark_times_pc_darts_against_darts(capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "search_step.py"
    spec = importlib.util.spec_from_file_location("search_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--channels", "4", "--layers", "3", "--image-size", "16", "--batch", "8",
                       "--repeats", "1", "--partial-channels", "2", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "pc-fast: PC-DARTS (partial channels K=2)" in out
    assert "supernet weights: reference 72204, pc-fast 29124" in out
    assert re.search(r"^reference +\d+\.\d +\d+\.\d{3} +\d+\.\d$", out, re.M)
    assert re.search(r"^pc-fast +\d+\.\d +\d+\.\d{3} +\d+\.\d$", out, re.M)
    assert "|pc-fast - reference K=2|" in out and "same mathematics: yes" in out
    assert re.fullmatch(r"speedup: \d+\.\d\d", out.strip().splitlines()[-1])


def test_under_bf16_autocast_the_fast_path_rounds_no_worse_than_the_reference():
    # on CUDA the weight step and the first-order α pass run under bf16 autocast; the fast
    # path's stacked edges (block-diagonal 1x1 convolutions, several filters per channel)
    # must lose no more to bf16 than the edges computed one by one
    torch.manual_seed(0)
    nets = {f: Supernet(8, 4, formulation=f, partial_channels=4) for f in ("fast", "reference")}
    nets["reference"].load_state_dict(nets["fast"].state_dict())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grads = {}
    for (name, net), bf16 in itertools.product(nets.items(), (False, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            features = net(x)
        loss = sum(f.float().square().mean() for f in features)
        grads[name, bf16] = torch.cat([g.flatten() for g in torch.autograd.grad(
            loss, net.arch_parameters())])  # fmt: skip
    exact = grads["reference", False]
    torch.testing.assert_close(grads["fast", False], exact, rtol=1e-4, atol=1e-6)
    cosine = {n: F.cosine_similarity(grads[n, True], exact, dim=0).item() for n in nets}
    error = {n: ((grads[n, True] - exact).norm() / exact.norm()).item() for n in nets}
    assert cosine["fast"] > 0.995, cosine
    assert error["fast"] <= 1.5 * error["reference"] + 1e-3, error
