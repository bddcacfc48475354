"""The collapse signals from curvature: the dominant Hessian eigenvalue, exact fp32, and
DARTS-ES early stopping; and the precision of the α gradient under bf16 autocast."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from maenas_ray.config import config_from_dict
from maenas_ray.engines import SearchLoop, dominant_eigenvalue, load_search_state, run_search
from maenas_ray.engines.hessian import collapse_stop, exact_fp32
from maenas_ray.mae import masked_mse
from maenas_ray.search import main as search_main
from maenas_ray.space import Genotype


def tiny(**search):
    return config_from_dict(
        {
            "data": {"dataset": "synthetic", "num_images": 128, "image_size": 8},
            "search": {
                "channels": 2,
                "layers": 3,
                "batch_size": 8,
                "epochs": 2,
                "steps_per_epoch": 2,
                "patch_size": 4,
                "eval_images": 16,
                "decoder_width": 8,
                "device": "cpu",
                "hessian_iters": 8,
                **search,
            },
        }
    )


def dense_dominant(hessian: torch.Tensor) -> float:
    values = torch.linalg.eigvalsh(hessian.double())
    return float(values[values.abs().argmax()])


def test_matches_a_dense_eigendecomposition_over_several_tensors_with_a_negative_one():
    # a quadratic form whose largest-magnitude eigenvalue is negative, over two tensors
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=torch.float64))
    spectrum = torch.tensor([-6.0, 3.0, 2.0, 1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    a = (q * spectrum) @ q.T
    x = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def loss() -> torch.Tensor:
        v = torch.cat([x, y.flatten()])
        return 0.5 * v @ a @ v

    got = dominant_eigenvalue(loss, [x, y], generator=torch.Generator().manual_seed(1))
    assert got == pytest.approx(-6.0, rel=1e-4)
    # and a function that is not quadratic: the Hessian at the point itself
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(flat: torch.Tensor) -> torch.Tensor:
        xx, ww = flat[:3], flat[3:].view(4, 3)
        return torch.tanh(ww @ xx).square().sum() - 0.7 * (xx.square().sum()) ** 2

    flat = torch.cat([x.detach(), w.detach().flatten()])
    want = dense_dominant(torch.autograd.functional.hessian(f, flat))
    got = dominant_eigenvalue(
        lambda: f(torch.cat([x, w.flatten()])), [x, w], iters=200,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    assert got == pytest.approx(want, rel=1e-6)


def test_matches_a_dense_eigendecomposition_on_the_alphas_of_a_tiny_supernet():
    loop = SearchLoop(tiny(hessian_iters=20))
    with torch.no_grad():  # α away from uniform, so the Hessian has structure
        for a in loop.alphas:
            a.normal_(generator=torch.Generator().manual_seed(3))
    x, mask = loop.hessian_batch()
    assert [tuple(a.shape) for a in loop.alphas] == [(14, 8), (14, 8)]
    names = loop.arch_names
    weights = {n: p.detach() for n, p in loop.model.named_parameters() if n not in names}

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        alphas = dict(zip(names, flat.view(2, 14, 8), strict=True))
        pred = torch.func.functional_call(loop.model, {**weights, **alphas}, (x, mask))
        return masked_mse(pred, x, mask)

    flat = torch.cat([a.detach().flatten() for a in loop.alphas])
    dense = torch.autograd.functional.hessian(loss_of, flat)
    assert dense.shape == (224, 224)
    assert torch.allclose(dense, dense.T, atol=1e-5)
    want = dense_dominant(dense)
    got = dominant_eigenvalue(
        lambda: loss_of(torch.cat([a.flatten() for a in loop.alphas])), loop.alphas,
        iters=60, generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    assert got == pytest.approx(want, rel=1e-3)
    # the search's own measurement (the default 20 steps, its own start vector)
    assert loop.hessian_eigenvalue() == pytest.approx(want, rel=0.02)


def test_bad_iterations_and_parameters_without_gradients_are_refused():
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="iters = 0: must be >= 1"):
        dominant_eigenvalue(lambda: x.square().sum(), [x], iters=0)
    with pytest.raises(ValueError, match="must require gradients"):
        dominant_eigenvalue(lambda: x.square().sum(), [torch.ones(2)])
    assert dominant_eigenvalue(lambda: x.sum(), [x]) == 0.0  # a zero Hessian


def test_exact_fp32_turns_autocast_and_reduced_precision_math_off_and_restores_them():
    conv = torch.backends.mkldnn.conv
    before = conv.fp32_precision
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with exact_fp32("cpu"):
            assert (a @ a).dtype == torch.float32
            assert conv.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            assert torch.backends.cudnn.rnn.fp32_precision == "ieee"
        assert (a @ a).dtype == torch.bfloat16
    assert conv.fp32_precision == before


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = (torch.cat([t.flatten().double() for t in g]) for g in (a, b))
    return float(F.cosine_similarity(x, y, dim=0))


def test_under_bf16_the_second_order_alpha_gradient_is_exact():
    # the same state, batches and masks under precision bf16 and fp32
    from maenas_ray.engines.common import autocast_for

    def cosines(unrolled: bool) -> float:
        loop = SearchLoop(tiny(precision="fp32", unrolled=unrolled, channels=4))
        x_w, x_a = next(iter(loop.data.w)), next(iter(loop.data.a))
        loop.weight_step(x_w, loop.masks()[1])  # a momentum buffer for the unrolled step
        mask_a, mask_w = loop.masks()
        fp32 = loop.alpha_gradients(x_a, mask_a, x_w, mask_w)[0]
        loop.autocast = autocast_for(loop.device, "bf16")  # what precision: bf16 sets
        assert loop._loss(x_a, mask_a)[1].dtype == torch.bfloat16
        return cosine(loop.alpha_gradients(x_a, mask_a, x_w, mask_w)[0], fp32)

    first, second = cosines(False), cosines(True)
    # the second order (finite differences, Hessian products) is exact; the first-order
    # gradient follows search.precision like the weight step (docs/performance.md: under
    # bf16 it moves by a tenth of what the next batch moves it)
    assert second > 0.9999
    assert 0.9 < first < 0.9999

    # what the second-order step gives when its passes do run under bf16 autocast: the
    # finite-difference product is lost in bf16's rounding (why it runs in fp32)
    from maenas_ray.engines.architect import _unrolled

    loop = SearchLoop(tiny(channels=4))
    x_w, x_a = next(iter(loop.data.w)), next(iter(loop.data.a))
    mask_a, mask_w = loop.masks()
    call = (loop.model, loop.arch_names, x_w, mask_w, x_a, mask_a, 0.025, 3e-4, {}, 0.9,
            False, 0.01, None)  # fmt: skip
    exact = _unrolled(*call)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = _unrolled(*call)
        loss, _ = loop._loss(x_a, mask_a, autocast=False)
        first_bf16 = list(torch.autograd.grad(loss, loop.alphas))
    first_fp32 = list(torch.autograd.grad(loop._loss(x_a, mask_a, autocast=False)[0], loop.alphas))
    assert cosine(rounded, exact) < cosine(first_bf16, first_fp32)


def test_the_collapse_rule():
    flat = [(e, 1.0) for e in range(1, 11)]
    assert collapse_stop(flat, 10, 5, 0.75) is None
    rising = [(e, 1.0 if e <= 5 else 2.0) for e in range(1, 11)]
    assert collapse_stop(rising, 9, 5, 0.75) is None  # both windows not measured yet
    kept, reason = collapse_stop(rising, 10, 5, 0.75)
    assert kept == 5
    assert "mean 1 over epochs 1-5, 2 over epochs 6-10 (ratio 0.50 < 0.75)" in reason
    # mildly rising (ratio 0.8): no stop; every other epoch measured: means of what is there
    assert collapse_stop([(e, 1.0 if e <= 5 else 1.25) for e in range(1, 11)], 10, 5, 0.75) is None
    sparse = [(e, 1.0 if e <= 6 else 3.0) for e in range(2, 13, 2)]
    assert collapse_stop(sparse, 12, 6, 0.75)[0] == 6
    assert collapse_stop([(e, -1.0 - e) for e in range(1, 11)], 10, 5, 0.75) is None


TRAJECTORY = [1.0, 1.1, 1.0, 1.2, 1.3, 3.0, 4.0, 5.0]  # epoch 6: λ̄(3..4) = 1.1, λ̄(5..6) = 2.15


def scripted_eigenvalues(monkeypatch):
    def measured(self):
        return TRAJECTORY[self.epoch - 1]

    monkeypatch.setattr(SearchLoop, "hessian_eigenvalue", measured)


def test_early_stop_keeps_the_architecture_of_window_epochs_before(monkeypatch, tmp_path):
    scripted_eigenvalues(monkeypatch)
    cfg = tiny(epochs=8, early_stop=True, early_stop_window=2, arch_lr=0.05)
    plain = run_search(tiny(epochs=8, arch_lr=0.05))  # the same search, never stopped

    class Save:
        def on_epoch_end(self, report):
            report.save_checkpoint(tmp_path / f"epoch{report.epoch}")

    stopped = run_search(cfg, [Save()])
    assert [m["epoch"] for m in stopped.history] == [1, 2, 3, 4, 5, 6]
    last = stopped.metrics
    assert last["stopped_early"] is True and last["kept_epoch"] == 4
    assert (
        "mean 1.1 over epochs 3-4, 2.15 over epochs 5-6 (ratio 0.51 < 0.75)" in last["stop_reason"]
    )
    assert [m["hessian_eigenvalue"] for m in stopped.history] == TRAJECTORY[:6]
    # the result is epoch 4's architecture, α included
    kept = plain.history[3]
    assert stopped.genotype == Genotype.from_json(kept["genotype"])
    assert last["genotype"] == kept["genotype"]
    state4 = load_search_state(tmp_path / "epoch4")
    assert torch.equal(stopped.alphas_normal, state4["model"]["encoder.alphas_normal"])
    # a stopped search takes no more epochs when resumed
    again = run_search(cfg, resume_from=tmp_path / "epoch6")
    assert len(again.history) == 6 and again.genotype == stopped.genotype
    # resumed from before the stop, it stops at the same epoch with the same result
    resumed = run_search(cfg, resume_from=tmp_path / "epoch3")
    timing = {"epoch_time", "images_per_sec", "hessian_time"}

    def untimed(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in timing} for m in history]

    assert untimed(resumed.history) == untimed(stopped.history)
    assert torch.equal(resumed.alphas_normal, stopped.alphas_normal)


def test_the_eigenvalue_is_reported_every_n_epochs():
    result = run_search(tiny(epochs=4, hessian_every=2, hessian_iters=3))
    have = [("hessian_eigenvalue" in m) for m in result.history]
    assert have == [False, True, False, True]
    assert all(m["hessian_time"] > 0 for m in result.history if "hessian_time" in m)
    off = run_search(tiny(epochs=1, hessian_every=0))
    assert "hessian_eigenvalue" not in off.metrics
    json.dumps(result.history)  # plain JSON for metrics.jsonl and Tune


def test_the_search_cli_says_when_and_why_it_stopped_early(monkeypatch, tmp_path, capsys):
    scripted_eigenvalues(monkeypatch)
    config = tmp_path / "stop.yaml"
    config.write_text(yaml.safe_dump(tiny(epochs=8, early_stop=True, early_stop_window=2,
                                          arch_lr=0.05).to_dict()))  # fmt: skip
    assert search_main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == [
        f"{e}/8" for e in range(1, 7)
    ]  # fmt: skip
    (line,) = [line for line in out.splitlines() if line.startswith("stopped early")]
    assert line.startswith("stopped early after epoch 6: ") and "ratio 0.51 < 0.75" in line
    assert line.endswith("the result is the architecture of epoch 4")
    saved = json.loads((tmp_path / "run" / "genotype.json").read_text())
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert Genotype.from_dict(saved) == Genotype.from_json(final["genotype"])
    assert final["kept_epoch"] == 4
