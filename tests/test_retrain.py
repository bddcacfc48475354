"""Retraining: the labelled batches, the engine, the Ray Train CLI, the sweep's proxy objective."""

import glob
import json
import shutil
from pathlib import Path

import pytest
import ray
import torch
import yaml

from maenas_ray import storage
from maenas_ray.config import ConfigError, config_from_dict, load_config, merge
from maenas_ray.data.labelled import HeldOutChunks, LabelledDeviceBatches, cutout
from maenas_ray.engines import SearchCallback
from maenas_ray.engines.retrain import load_retrain_state, run_retrain, topk_correct
from maenas_ray.retrain import main
from maenas_ray.runs import FAULT_ENV
from maenas_ray.space import PUBLISHED, Genotype
from maenas_ray.sweep_space import load_sweep

TINY = {
    "data": {"dataset": "synthetic", "num_images": 512, "image_size": 16},
    "retrain": {
        "channels": 8, "layers": 5, "auxiliary": False, "epochs": 2, "batch_size": 32,
        "lr": 0.05, "cutout": 4, "eval_images": 256, "device": "cpu",
    },
}  # fmt: skip


def tiny(**retrain):
    return config_from_dict(merge(TINY, {"retrain": retrain}))


def test_cutout_zeroes_one_clipped_square_per_image():
    x = torch.ones(64, 3, 8, 8)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).all(dim=1).flatten(1).sum(dim=1)  # zeroed pixels per image
    assert zeros.max() == 16 and zeros.min() >= 4  # 4x4, or clipped at a corner
    assert torch.equal(cutout(x, 0, torch.Generator()), x)


def test_labelled_shards_partition_the_batches_and_the_held_out_set():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)
    mean, std = torch.zeros(3), torch.ones(3)

    def batches(shard):
        gen = torch.Generator().manual_seed(1)
        return list(LabelledDeviceBatches(images, labels, mean, std, 8, True, 2, gen, shard))

    whole, r0, r1 = batches((0, 1)), batches((0, 2)), batches((1, 2))
    for (x, y), (x0, y0), (x1, y1) in zip(whole, r0, r1, strict=True):
        assert torch.equal(x0, x[0::2]) and torch.equal(x1, x[1::2])
        assert torch.equal(y0, y[0::2]) and torch.equal(y1, y[1::2])
    held = [HeldOutChunks(images[:13], labels[:13], mean, std, 8, (r, 2)) for r in range(2)]
    seen = sorted(int(v) for h in held for _, y in h for v in y)
    assert seen == list(range(13))  # every held-out image once, over the ranks


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])
    assert topk_correct(logits, torch.tensor([1, 2]), (1, 2)).tolist() == [1, 2]
    assert topk_correct(logits, torch.tensor([1, 2]), (5,)).tolist() == [2]  # k > classes


class Crash(SearchCallback):
    def __init__(self, directory, after):
        self.directory, self.after = directory, after

    def on_epoch_end(self, report):
        report.save_checkpoint(self.directory)
        if report.epoch == self.after:
            raise KeyboardInterrupt("simulated crash")


def test_retrain_learns_the_synthetic_task_and_resumes_exactly(tmp_path):
    cfg = tiny()
    full = run_retrain(cfg, PUBLISHED["DARTS_V2"])
    m = full.metrics
    assert m["epoch"] == 2 and m["top1"] > 0.25  # 10 classes: chance is 0.1
    assert m["top5"] >= m["top1"] and m["drop_path"] == pytest.approx(0.1)  # ramped: 0.2 * 1/2
    assert full.parameters == m["parameters"] > 0 and m["macs"] > 0
    with pytest.raises(KeyboardInterrupt):
        run_retrain(cfg, PUBLISHED["DARTS_V2"], Crash(tmp_path, after=1))
    state = load_retrain_state(tmp_path)
    assert state["epoch"] == 1
    from maenas_ray.engines.retrain import STATE_KEYS

    assert set(state) == {"format", *STATE_KEYS}  # all that load_retrain_state requires
    resumed = run_retrain(cfg, PUBLISHED["DARTS_V2"], resume_from=tmp_path)
    assert resumed.history[0] == full.history[0] | {
        k: resumed.history[0][k] for k in ("images_per_sec", "epoch_time")
    }
    assert resumed.metrics["top1"] == m["top1"] and resumed.metrics["test_loss"] == m["test_loss"]


def test_the_proxy_is_scored_on_held_out_training_images_not_the_test_split():
    cfg = tiny(epochs=1, proxy_epochs=1, proxy_channels=8, proxy_layers=5)
    proxy = run_retrain(cfg, PUBLISHED["DARTS_V2"], proxy=True).metrics
    assert proxy["held_out_images"] == 51  # 10% of the 512 training images
    full = run_retrain(cfg, PUBLISHED["DARTS_V2"]).metrics
    assert full["held_out_images"] == 102  # the synthetic test split (fewer than eval_images)


def test_the_dataloader_path_trains_and_resumes(tmp_path):
    changes = {"data": {"loader": "workers", "num_workers": 0},
               "retrain": {"epochs": 2, "steps_per_epoch": 4}}  # fmt: skip
    cfg = config_from_dict(merge(TINY, changes))
    with pytest.raises(KeyboardInterrupt):
        run_retrain(cfg, PUBLISHED["DARTS_V2"], Crash(tmp_path, after=1))
    resumed = run_retrain(cfg, PUBLISHED["DARTS_V2"], resume_from=tmp_path)
    assert [m["epoch"] for m in resumed.history] == [1, 2]
    assert 0.0 <= resumed.metrics["top1"] <= resumed.metrics["top5"] <= 1.0
    assert resumed.metrics["steps"] == 4


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    from maenas_ray.engines import CheckpointMismatchError

    run_retrain(tiny(epochs=1), PUBLISHED["DARTS_V2"], Crash(tmp_path, after=None))
    with pytest.raises(CheckpointMismatchError, match="the genotype"):
        run_retrain(tiny(epochs=1), PUBLISHED["DARTS_V1"], resume_from=tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"retrain.lr: 0.05 -> 0.1"):
        run_retrain(tiny(epochs=1, lr=0.1), PUBLISHED["DARTS_V2"], resume_from=tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["retrain.drop_path=1.0"], r"retrain.drop_path = 1.0: must be in \[0, 1\)"),
        (["retrain.lr_schedule=step"], r"retrain.lr_schedule = 'step': expected one of"),
        (["retrain.num_workers=5"], r"retrain.batch_size = 96: must be divisible by retrain"),
        (["retrain.label_smoothing=-0.1"], r"retrain.label_smoothing = -0.1: must be in"),
        (["retrain.layers=2"], r"retrain.layers = 2: must be >= 3"),
        (["retrain.eval_images=1", "retrain.num_workers=2"],
         r"retrain.eval_images = 1: must be >= retrain.num_workers \(2\)"),
        (["retrain.proxy_val_fraction=0"], r"retrain.proxy_val_fraction = 0.0: must be in"),
    ],
)  # fmt: skip
def test_retrain_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_proxy_network_that_cannot_be_built_is_a_sweep_config_error():
    overrides = ["data.image_size=16", "search.patch_size=4", "space={mask_ratio: {choice: [0.5]}}"]
    with pytest.raises(ConfigError, match=r"retrain.auxiliary = True: the proxy network at "
                       r"data.image_size 16: .*auxiliary head needs a larger input"):  # fmt: skip
        load_sweep(None, overrides)
    load_sweep(None, [*overrides, "retrain.auxiliary=false"])
    with pytest.raises(ConfigError, match=r"tune.scheduler = 'asha': stops trials on search"):
        load_sweep(None, [*overrides, "retrain.auxiliary=false", "tune.scheduler=asha"])


def test_cli_bad_genotypes_fail_before_ray_starts(tmp_path, capsys):
    bad = tmp_path / "g.json"
    bad.write_text('{"normal": []}')
    for args, message in [
        (["--genotype", "DARTS_V9"], "neither a file nor a published genotype (DARTS_V1"),
        (["--genotype", str(bad)], "genotype keys: missing"),
        (["--experiment", str(tmp_path)], "not a sweep experiment"),
        (["--genotype", "DARTS_V2", "--set", "retrain.cutout=-1"], "retrain.cutout = -1"),
    ]:
        assert main([*args, "--storage-path", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not ray.is_initialized()


def test_two_worker_gloo_retrain_reports_checkpoints_and_resumes(tmp_path, capsys, monkeypatch):
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["--genotype", "DARTS_V2", "--config", str(config), "--num-workers", "2",
            "--storage-path", str(tmp_path / "runs"), "--name", "r", "--num-cpus", "2",
            "--no-dashboard"]  # fmt: skip
    monkeypatch.setenv(FAULT_ENV, "retrain:exit@1")  # rank 0 dies after epoch 1's checkpoint
    assert main(args) == 1
    assert "retraining DARTS_V2 failed" in capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    pattern = str(run / "checkpoint_*" / "retrain_state.pt")
    first = {p: Path(p).stat().st_mtime_ns for p in glob.glob(pattern)}
    assert [load_retrain_state(p)["epoch"] for p in first] == [1]
    assert main(args) == 0  # the same storage path and name: resumes after epoch 1
    out = capsys.readouterr().out
    epochs = sorted(load_retrain_state(p)["epoch"] for p in glob.glob(pattern))
    assert epochs == [1, 2] and all(Path(p).stat().st_mtime_ns == t for p, t in first.items())
    final = load_retrain_state(max(glob.glob(pattern)))
    top1 = json.loads(final["history"])[-1]["top1"]
    assert top1 > 0.25  # above the 0.1 of chance
    assert f"top-1 {top1:.4f}" in out and "multiply-adds" in out and "parameters" in out


def test_sweep_with_the_proxy_objective_ranks_by_proxy_top1(tmp_path, capsys, monkeypatch):
    from maenas_ray.orchestration import experiment as ex
    from maenas_ray.retrain import top_genotypes
    from maenas_ray.sweep import main as sweep

    config = {
        **TINY,
        "search": {"channels": 4, "layers": 3, "batch_size": 8, "epochs": 1,
                   "steps_per_epoch": 2, "patch_size": 4, "eval_images": 16,
                   "decoder_width": 8, "device": "cpu", "hessian_iters": 2},
        "retrain": {**TINY["retrain"], "proxy_epochs": 2, "proxy_channels": 8,
                    "proxy_layers": 5},
        "space": {"mask_ratio": {"low": 0.3, "high": 0.7}},
        "tune": {"num_samples": 4, "cpus_per_trial": 1, "seed": 3},
        "objective": {"metric": "proxy_top1"},
    }  # fmt: skip
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    # each trial's proxy retrain dies once after its first epoch: the restarted trial
    # must go straight to the proxy stage and resume it
    monkeypatch.setenv(FAULT_ENV, "retrain:exit@1")
    rc = sweep(["--config", str(path), "--storage-path", str(tmp_path / "s"), "--name", "p",
                "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    experiment = tmp_path / "s" / "p"
    cfg = ex.load_sweep_config(storage.resolve_storage(str(experiment)))
    import ray.tune

    results = ray.tune.Tuner.restore(str(experiment), ex.trainable(cfg)).get_results()
    scores = sorted((r.metrics["proxy_top1"] for r in results), reverse=True)
    assert len(scores) == 4 and not results.errors and all(s > 0.1 for s in scores)
    for r in results:
        trial = Path(r.path)
        assert (trial / "fault-injected-retrain-exit@1").is_file()
        assert r.metrics["proxy_epoch"] == 2 and r.metrics["epoch"] == 1  # search + proxy
        search_ckpts = glob.glob(str(trial / "search" / "checkpoint_epoch_*"))
        assert len(search_ckpts) == 1  # the search ran once: the restart skipped it
        proxy = sorted(
            load_retrain_state(p)["epoch"]
            for p in glob.glob(str(trial / "proxy" / "checkpoint_*" / "retrain_state.pt"))
        )
        assert proxy == [1, 2]
    from maenas_ray.results import load_experiment

    every = load_experiment(str(experiment)).best(4)
    ranked = every[:2]
    assert [s for _, s, _ in ranked] == scores[:2]  # ranked by proxy_top1, best first
    # proxy accuracies on a few images tie often: Tune may pick another of the tied best
    best = results.get_best_result(metric="proxy_top1", mode="max")
    assert best.path in [t.path for _, s, t in every if s == scores[0]]
    by_path = {r.path: r for r in results}
    assert ranked[0][0] == Genotype.from_json(by_path[ranked[0][2].path].metrics["genotype"])
    assert f"best genotype (proxy_top1 = {scores[0]:.4g}" in out
    _, top = top_genotypes(str(experiment), 2)
    assert [job.genotype for job in top] == [g for g, _, _ in ranked]
    assert [job.trial_id for job in top] == [t.trial_id for _, _, t in ranked]

    # the label-free score against accuracy: scipy's τ and ρ over the finished trials,
    # printed under the leaderboard; with an errored and an unfinished trial left out
    from scipy import stats

    finals = {t.name: json.loads((t / "result.json").read_text().splitlines()[-1])
              for t in experiment.glob("trial_*")}  # fmt: skip
    xs = [-m["eval_loss"] for m in finals.values()]
    ys = [m["proxy_top1"] for m in finals.values()]
    first, second = sorted(experiment.glob("trial_*"))[:2]
    unfinished, errored = experiment / "trial_unfinished", experiment / "trial_errored"
    for source, copy in ((first, unfinished), (second, errored)):  # as if cut after epoch 1
        shutil.copytree(source, copy)
        lines = (copy / "result.json").read_text().splitlines()
        (copy / "result.json").write_text(lines[0] + "\n")
    (errored / "error.txt").write_text("Traceback ...\nRuntimeError: the node died\n")
    corr = load_experiment(str(experiment)).correlation()
    assert corr.n == 4 and corr.left_out == {"errored": 1, "unfinished": 1,
                                             "without proxy_top1": 0}  # fmt: skip
    assert corr.tau == pytest.approx(stats.kendalltau(xs, ys).statistic, abs=1e-12)
    assert corr.tau_p == pytest.approx(stats.kendalltau(xs, ys).pvalue, abs=1e-12)
    assert corr.rho == pytest.approx(stats.spearmanr(xs, ys).statistic, abs=1e-12)
    assert corr.rho_p == pytest.approx(stats.spearmanr(xs, ys).pvalue, abs=1e-12)
    line = (f"Kendall τ(−eval_loss, proxy_top1) = {corr.tau:.3f} (Spearman ρ = {corr.rho:.3f}, "
            f"p = {corr.tau_p:.2g}, n = 4 trials); left out: 1 errored, 1 unfinished")  # fmt: skip
    assert corr.line() == line
    assert f"Kendall τ(−eval_loss, proxy_top1) = {corr.tau:.3f}" in out  # the sweep's end
    from maenas_ray.genotypes import main as genotypes

    assert genotypes([str(experiment), "--format", "table"]) == 0
    assert line in capsys.readouterr().out

    # full retrains recorded into the sweep: the same against their final top-1, with a
    # number once three trials have one
    from maenas_ray.retrain import Job, record_retrain

    exp = load_experiment(str(experiment))
    done = [t for t in exp.trials() if t.status == "done"]
    record_retrain(Job("a", done[0].genotype, exp, done[0].trial_id), {"top1": 0.5, "epoch": 3})
    retrained = exp.correlation("retrain_top1")
    assert retrained.tau is None and retrained.left_out["without retrain_top1"] == 3
    assert (
        "1 finished trial(s) with both eval_loss and retrain_top1; a rank correlation "
        "needs at least 3" in retrained.line()
    )
    for t, top1 in zip(done[1:3], (0.6, 0.7), strict=True):
        record_retrain(Job("b", t.genotype, exp, t.trial_id), {"top1": top1})
    retrained = load_experiment(str(experiment)).correlation("retrain_top1")
    want = stats.kendalltau([-t.metrics["eval_loss"] for t in done[:3]], [0.5, 0.6, 0.7])
    assert retrained.n == 3 and retrained.tau == pytest.approx(want.statistic, abs=1e-12)
    assert genotypes([str(experiment), "--format", "table"]) == 0
    assert "Kendall τ(−eval_loss, retrain_top1) = " in capsys.readouterr().out
    # the report draws the score against accuracy, and the collapse signals per epoch
    from maenas_ray.report import write_report

    index = write_report(load_experiment(str(experiment)), tmp_path / "report")
    text = index.read_text()
    for picture in ("score_vs_accuracy.png", "collapse_over_time.png"):
        assert (tmp_path / "report" / picture).stat().st_size > 10_000
        assert picture in text
    assert "Kendall τ(−eval_loss, retrain_top1) = " in text
