import json

import matplotlib.image
import pytest
import torch

from maenas_ray.config import config_from_dict
from maenas_ray.data import ImageDataset, make_synthetic
from maenas_ray.engines import (
    CheckpointMismatchError,
    SearchCallback,
    load_search_state,
    run_search,
    unrolled_arch_gradients,
)
from maenas_ray.mae import HierarchicalDecoder, MaskedAutoencoder, masked_mse, random_patch_mask
from maenas_ray.space import Genotype, Supernet


def tiny(data=None, **search):
    return config_from_dict(
        {
            "data": {"num_images": 64, "image_size": 16, **(data or {})},
            "search": {
                "channels": 4, "layers": 3, "batch_size": 8, "epochs": 3, "steps_per_epoch": 3,
                "patch_size": 4, "eval_images": 16, "decoder_width": 8, "device": "cpu",
                "hessian_iters": 2, **search,
            },
        }
    )  # fmt: skip


class Recorder(SearchCallback):
    def __init__(self, checkpoint_dir=None, crash_after=None):
        self.reports, self.checkpoint_dir, self.crash_after = [], checkpoint_dir, crash_after

    def on_epoch_end(self, report):
        self.reports.append(report)
        if self.checkpoint_dir is not None:
            report.save_checkpoint(self.checkpoint_dir)
        if report.epoch == self.crash_after:
            raise KeyboardInterrupt("simulated crash")


def test_tiny_search_lowers_the_loss_and_writes_genotype_and_pictures(tmp_path):
    cfg = tiny(data={"num_images": 128}, epochs=5, steps_per_epoch=6, lr=0.05)
    rec = Recorder()
    result = run_search(cfg, rec, out_dir=tmp_path)
    history = result.history
    assert [r.epoch for r in rec.reports] == [1, 2, 3, 4, 5]
    # W-split loss, and the A-split loss (images the weights never train on)
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.8 * history[0]["val_loss"]
    assert history[-1]["val_psnr"] > history[0]["val_psnr"]
    assert 5 < history[-1]["eval_psnr"] < 60 and history[-1]["eval_loss"] > 0
    for key in ("val_loss", "val_psnr", "skip_count", "alpha_entropy", "images_per_sec", "lr"):
        assert key in history[-1]
    assert 0 < history[-1]["alpha_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert history[0]["lr"] == 0.05 and history[-1]["lr"] < 0.05  # cosine schedule
    genotype = Genotype.from_json((tmp_path / "genotype.json").read_text())
    assert genotype == result.genotype == Genotype.from_json(history[-1]["genotype"])
    assert history[-1]["skip_count"] == genotype.count("skip_connect")
    for name in ("reconstruction.png", "alphas.png", "cells.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


class NoLabels(ImageDataset):
    """Images with labels that raise on any access."""

    def __init__(self):
        base = make_synthetic(64, 16, 10, seed=0)
        self.images, self.mean, self.std, self.num_classes = (
            base.images, base.mean, base.std, base.num_classes,
        )  # fmt: skip

    def __len__(self):
        return self.images.shape[0]

    def image(self, index):
        return self.images[index]

    def label(self, index):
        raise AssertionError("the search read a label")

    @property
    def labels(self):
        raise AssertionError("the search read the labels")

    def __getitem__(self, index):
        raise AssertionError("the search used (image, label) access")


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_search_never_reads_labels(loader):
    cfg = tiny(data={"loader": loader, "num_workers": 0}, epochs=1, steps_per_epoch=2)
    result = run_search(cfg, dataset=NoLabels())
    assert len(result.history) == 1


def test_resume_gives_the_same_alphas_as_an_uninterrupted_run(tmp_path):
    cfg = tiny(epochs=3)
    full = run_search(cfg)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, Recorder(tmp_path / "ckpt", crash_after=2))
    state = load_search_state(tmp_path / "ckpt")
    assert state["epoch"] == 2
    resumed_rec = Recorder()
    resumed = run_search(cfg, resumed_rec, resume_from=tmp_path / "ckpt")
    assert [r.epoch for r in resumed_rec.reports] == [3]  # epochs 1-2 are not recomputed
    assert torch.equal(resumed.alphas_normal, full.alphas_normal)
    assert torch.equal(resumed.alphas_reduce, full.alphas_reduce)
    assert resumed.genotype == full.genotype
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]


def test_resume_with_another_config_is_refused(tmp_path):
    run_search(tiny(epochs=1), Recorder(tmp_path))
    with pytest.raises(CheckpointMismatchError, match=r"search.mask_ratio: 0.5 -> 0.25"):
        run_search(tiny(epochs=1, mask_ratio=0.25), resume_from=tmp_path)


class Payload:
    """Stands for code a malicious checkpoint would run when unpickled."""


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "search_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"search_state\.pt' is unreadable \(.*\): cut short") as e:
        load_search_state(tmp_path)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    # a file holding other objects is refused without PyTorch's advice to unpickle it
    torch.save({"format": "maenas-search-v1", "model": Payload()}, tmp_path / "search_state.pt")
    with pytest.raises(ValueError, match=r"is refused: it holds objects other than tensors") as e:
        load_search_state(tmp_path)
    assert "weights_only" not in str(e.value) and "Re-running" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="no search checkpoint"):
        load_search_state(tmp_path / "missing")


def test_a_checkpoint_holds_every_state_key_and_an_incomplete_one_is_named(tmp_path):
    from maenas_ray.engines import SearchLoop, save_search_state
    from maenas_ray.engines.search import OPTIONAL_STATE_KEYS, STATE_KEYS

    state = SearchLoop(tiny()).state()
    assert set(state) == {"format", *STATE_KEYS, *OPTIONAL_STATE_KEYS}
    del state["a_opt"]
    save_search_state(state, tmp_path)
    with pytest.raises(ValueError, match=r"search_state\.pt' is incomplete: no a_opt"):
        load_search_state(tmp_path)


def test_checkpoint_is_loadable_without_unpickling_code(tmp_path):
    run_search(tiny(epochs=1), Recorder(tmp_path))
    state = torch.load(tmp_path / "search_state.pt", weights_only=True)
    assert state["epoch"] == 1 and "encoder.alphas_normal" in state["model"]
    assert json.loads(state["history"])[0]["epoch"] == 1


def test_unrolled_search_runs_and_differs_from_first_order():
    first = run_search(tiny(epochs=1, steps_per_epoch=2))
    second = run_search(tiny(epochs=1, steps_per_epoch=2, unrolled=True))
    assert not torch.allclose(first.alphas_normal, second.alphas_normal)


def test_bf16_autocast_path_runs():
    result = run_search(tiny(epochs=1, steps_per_epoch=1, precision="bf16"))
    assert result.history[0]["train_loss"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(RuntimeError, match=r"search\.device = 'cuda' but CUDA is not available"):
        run_search(tiny(device="cuda"))


def _tiny_mae():
    torch.manual_seed(0)
    enc = Supernet(2, 3)
    with torch.no_grad():
        for a in enc.arch_parameters():
            a.normal_()
    return MaskedAutoencoder(enc, HierarchicalDecoder(enc.feature_channels, width=4)).double()


def test_second_order_gradient_matches_finite_differences():
    model = _tiny_mae().train()
    gen = torch.Generator().manual_seed(1)
    x_w = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    x_a = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    m_w = random_patch_mask(4, 8, 8, 4, 0.5, generator=gen)
    m_a = random_patch_mask(4, 8, 8, 4, 0.5, generator=gen)
    arch = ["encoder.alphas_normal", "encoder.alphas_reduce"]
    params = dict(model.named_parameters())
    weight_names = [n for n in params if n not in arch]
    buffers = {n: 0.01 * torch.randn_like(params[n]) for n in weight_names[::3]}
    lr, wd, mom = 0.05, 3e-4, 0.9
    # DARTS' radius (0.01 / |v|) is tuned for float32 and large models; on this tiny float64
    # model a small radius keeps the Hessian-vector product on one linear piece of the ReLUs
    grads = unrolled_arch_gradients(
        model, arch, x_w, m_w, x_a, m_a, lr, wd, buffers, mom, fd_radius=1e-6
    )

    def val_after_unrolled_step(alphas):
        """L_A(w'(α), α) with w'(α) = w - lr (mom * buf + ∇w L_W(w, α) + wd * w), exactly."""
        w = {n: params[n].detach().clone().requires_grad_() for n in weight_names}
        pred = torch.func.functional_call(model, {**w, **alphas}, (x_w, m_w))
        g = torch.autograd.grad(masked_mse(pred, x_w, m_w), list(w.values()))
        w2 = {
            n: w[n] - lr * (gi + wd * w[n] + mom * buffers.get(n, torch.zeros_like(gi)))
            for n, gi in zip(weight_names, g, strict=True)
        }
        pred = torch.func.functional_call(model, {**w2, **alphas}, (x_a, m_a))
        return masked_mse(pred, x_a, m_a).item()

    base = {n: params[n].detach().clone() for n in arch}
    first_order = torch.autograd.grad(
        masked_mse(model(x_a, m_a), x_a, m_a), [params[n] for n in arch]
    )
    h = 1e-5
    coords = [(0, 0, 4), (0, 3, 1), (0, 13, 7), (1, 2, 5), (1, 9, 3), (1, 12, 6)]
    fd, analytic, first = [], [], []
    for which, row, col in coords:
        plus = {n: t.clone() for n, t in base.items()}
        minus = {n: t.clone() for n, t in base.items()}
        plus[arch[which]][row, col] += h
        minus[arch[which]][row, col] -= h
        fd.append((val_after_unrolled_step(plus) - val_after_unrolled_step(minus)) / (2 * h))
        analytic.append(grads[which][row, col].item())
        first.append(first_order[which][row, col].item())
    fd_t, an_t, first_t = map(torch.tensor, (fd, analytic, first))
    assert torch.allclose(an_t, fd_t, rtol=1e-4, atol=1e-7), (an_t, fd_t)
    assert not torch.allclose(first_t, fd_t, rtol=1e-2, atol=1e-5), (first_t, fd_t)

    # and on every coordinate, against the exact hypergradient by double backward
    w = {n: params[n] for n in weight_names}
    alphas = {n: params[n] for n in arch}
    pred = torch.func.functional_call(model, {**w, **alphas}, (x_w, m_w))
    g = torch.autograd.grad(masked_mse(pred, x_w, m_w), list(w.values()), create_graph=True)
    w2 = {
        n: w[n] - lr * (gi + wd * w[n] + mom * buffers.get(n, torch.zeros_like(gi)))
        for n, gi in zip(weight_names, g, strict=True)
    }
    pred = torch.func.functional_call(model, {**w2, **alphas}, (x_a, m_a))
    exact = torch.autograd.grad(masked_mse(pred, x_a, m_a), list(alphas.values()))
    for got, want in zip(grads, exact, strict=True):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)


def test_only_the_search_sections_must_match_to_resume():
    from maenas_ray.engines.common import config_changes

    saved = tiny().to_dict()
    sweep = {**saved, "name": "quickstart-20260101", "tune": {**saved["tune"], "seed": 5}}
    assert config_changes(saved, sweep) == []  # name, tune, space: the sweep around it
    assert config_changes(saved, {**saved, "search": {**saved["search"], "lr": 0.1}}) == [
        "search.lr: 0.025 -> 0.1"
    ]
    # a checkpoint saved before the evaluation masks were resolved at load (nulls there)
    # resumes a run whose masks are the defaults, and not one with other masks
    old = {**saved, "search": {**saved["search"], "eval_mask_ratio": None}}
    assert config_changes(old, saved) == []
    other = {**saved, "search": {**saved["search"], "eval_mask_ratio": 0.9}}
    assert config_changes(old, other) == [
        f"search.eval_mask_ratio: {saved['search']['mask_ratio']!r} -> 0.9"
    ]


def test_a_non_finite_loss_stops_the_search_naming_epoch_and_step():
    with pytest.raises(
        FloatingPointError, match=r"non-finite reconstruction loss in epoch 1, step 1 "
        r"\(learning rates: weights 1e\+10, α 0.0003; lower search.lr / search.arch_lr, or set "
        r"search.nan_retries\)"
    ):  # fmt: skip
        run_search(tiny(lr=1e10, epochs=2))


def test_nan_retries_go_back_to_the_last_epoch_with_lower_learning_rates(tmp_path):
    # the first epoch diverges at lr 1e10; the retry starts it again at 1e10 * 1e-11
    cfg = tiny(lr=1e10, lr_min=0.0, epochs=2, nan_retries=2, nan_lr_factor=1e-11)
    recorder = Recorder(tmp_path)
    with pytest.warns(UserWarning, match=r"step 1 .*; retrying from epoch 0 with the learning "
                      r"rates times 1e-11 \(weights now 0.1; 1 retries left\)"):  # fmt: skip
        result = run_search(cfg, recorder)
    assert [r.epoch for r in recorder.reports] == [1, 2]
    assert result.history[0]["lr"] == pytest.approx(0.1)
    assert result.history[1]["lr"] == pytest.approx(0.05)  # the cosine schedule, scaled
    state = load_search_state(tmp_path)  # a resume keeps the lowered rates
    assert state["scheduler"]["base_lrs"] == [pytest.approx(0.1)]
    assert state["a_opt"]["param_groups"][0]["lr"] == pytest.approx(cfg.search.arch_lr * 1e-11)
    # a search may be resumed with other retry settings (the advice the error gives)
    from maenas_ray.engines.common import config_changes

    other = tiny(lr=1e10, lr_min=0.0, epochs=2, nan_retries=0, nan_lr_factor=0.5)
    assert config_changes(state["config"], other.to_dict()) == []
    # too few retries, or a factor too mild: the error, after the retries it had
    with pytest.warns(UserWarning, match="0 retries left"), pytest.raises(FloatingPointError):
        run_search(tiny(lr=1e10, epochs=2, nan_retries=1, nan_lr_factor=0.5))


@pytest.mark.parametrize("how", ["raises", "nan-metric"])
def test_a_retried_epoch_starts_from_the_unchanged_end_of_the_last_epoch(monkeypatch, how):
    # epoch 2 "diverges" twice after running (weights, momentum and Adam moments changed):
    # each retry must start from the state at the end of epoch 1 as it was, so the result
    # is that of a run without failures whose rates were lowered as the retries lower them
    # (by the factor twice) before epoch 2
    from maenas_ray.engines import SearchLoop

    factor = 0.5
    cfg = tiny(epochs=2, nan_retries=2, nan_lr_factor=factor)
    clean = SearchLoop(cfg)
    clean.run_epoch()
    clean.scale_lr(factor * factor)
    clean.run_epoch()
    real, failures = SearchLoop.run_epoch, [2]

    def diverging(self):
        metrics = real(self)
        if self.epoch == 2 and failures[0]:
            failures[0] -= 1
            if how == "raises":  # a non-finite training loss
                raise FloatingPointError("injected")
            return {**metrics, "eval_loss": float("nan")}  # weights that blew up at the end
        return metrics

    monkeypatch.setattr(SearchLoop, "run_epoch", diverging)
    expected = "injected" if how == "raises" else r"non-finite metrics after epoch 2: .*"
    with pytest.warns(UserWarning, match=rf"{expected}; retrying from epoch 1"):
        retried = run_search(cfg)
    assert failures == [0]
    assert retried.metrics["eval_loss"] == clean.history[-1]["eval_loss"]
    assert torch.equal(retried.alphas_normal, clean.alphas[0].detach())


def test_unrolled_mode_reports_the_a_loss_at_w_not_at_the_virtual_step():
    from maenas_ray.engines import SearchLoop

    loop = SearchLoop(tiny(unrolled=True))
    x_w, x_a = next(iter(loop.data.w)), next(iter(loop.data.a))
    loop.weight_step(x_w, loop.masks()[1])
    mask_a, mask_w = loop.masks()
    _, loss, _ = loop.alpha_gradients(x_a, mask_a, x_w, mask_w)
    with torch.no_grad():
        at_w = loop._loss(x_a, mask_a)[0]
    assert loss.item() == at_w.item()
