"""The sweep: config checks before Ray starts, Tune/Optuna wiring, real Ray sweeps, resume."""

import contextlib
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import ray
import ray.tune
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maenas_ray import storage
from maenas_ray.config import ConfigError, config_from_dict, load_config, merge
from maenas_ray.engines import load_search_state, run_search
from maenas_ray.orchestration import experiment as ex
from maenas_ray.orchestration.stages import (
    DRIVER_CPU,
    in_trial_process,
    trial_resources,
    worker_resources,
)
from maenas_ray.results import STUDY_JOURNAL
from maenas_ray.runs import (
    FAULT_ENV,
    TENSORBOARD_TAG,
    prune_checkpoints,
    remove_stale_scratch,
    scratch,
)
from maenas_ray.space import Genotype
from maenas_ray.sweep import QUICKSTART, main
from maenas_ray.sweep_space import load_sweep

REPO = Path(__file__).resolve().parent.parent

TINY = {
    "data": {"dataset": "synthetic", "num_images": 64, "image_size": 16},
    "search": {
        "channels": 4, "layers": 3, "batch_size": 8, "epochs": 2, "steps_per_epoch": 2,
        "patch_size": 4, "eval_images": 16, "decoder_width": 8, "device": "cpu", "hessian_iters": 2,
    },
    "space": {
        "mask_ratio": {"low": 0.3, "high": 0.7},
        "patch_size": {"choice": [4, 8]},
        "decoder_depth": {"low": 1, "high": 2},
    },
    "tune": {"num_samples": 3, "cpus_per_trial": 1, "seed": 1},
    "objective": {"metric": "eval_loss"},
}  # fmt: skip


def write_config(tmp_path, **sections):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, sections)))
    return path


# --- config and wiring, no Ray --------------------------------------------------------


def test_shipped_sweep_configs_are_valid():
    names = {p.name for p in (REPO / "tune_configs").glob("*.yaml")}
    assert {"quickstart.yaml", "cifar10.yaml", "imagenet.yaml", "ablation_decoder.yaml"} <= names
    quick = load_sweep(QUICKSTART)
    assert quick.tune.num_samples == 4 and quick.tune.gpus_per_trial == 0
    assert quick.data.dataset == "synthetic"
    cifar = load_sweep(REPO / "tune_configs" / "cifar10.yaml")
    s = cifar.search  # docs/method.md §1.4 defaults, one GPU per trial
    assert (s.channels, s.layers, s.epochs, s.batch_size, s.lr, s.arch_lr) == (
        16, 8, 50, 64, 0.025, 3e-4,
    )  # fmt: skip
    assert cifar.data.dataset == "cifar10" and cifar.tune.gpus_per_trial == 1
    assert {"mask_ratio", "patch_size", "decoder_depth"} <= set(cifar.space)
    imagenet_yaml = REPO / "tune_configs" / "imagenet.yaml"
    imagenet = load_sweep(imagenet_yaml, [f"data.root={REPO}"])
    assert imagenet.data.dataset == "imagefolder" and imagenet.data.image_size == 224
    assert imagenet.search.stem == "imagenet"
    ablation = load_sweep(REPO / "tune_configs" / "ablation_decoder.yaml")
    assert ablation.space["decoder"].choice == ["hierarchical", "plain"]
    assert "mask_ratio" in ablation.space
    quick_ablation = load_sweep(REPO / "tune_configs" / "ablation_quick.yaml")  # docs/ablation.md
    assert quick_ablation.space["decoder"].choice == ["hierarchical", "plain"]
    assert quick_ablation.space["mask_ratio"].choice == [0.1, 0.3, 0.5, 0.7]
    assert quick_ablation.tune.sampler == "grid" and quick_ablation.tune.num_samples == 8
    assert quick_ablation.objective.metric == "proxy_top1"  # both scores, for Kendall τ


def test_search_domains_cover_the_configured_ranges(tmp_path):
    cfg = load_sweep(write_config(tmp_path))
    space = ex.param_space(cfg)["search"]
    assert (space["mask_ratio"].lower, space["mask_ratio"].upper) == (0.3, 0.7)
    assert space["patch_size"].categories == [4, 8]
    assert (space["decoder_depth"].lower, space["decoder_depth"].upper) == (1, 3)  # exclusive
    step = ex.search_domain("decoder_depth", ex.ParamSpec(low=1, high=5, step=2))
    assert (step.lower, step.upper) == (1, 5)  # qrandint: inclusive
    log = ex.search_domain("lr", ex.ParamSpec(low=1e-3, high=1e-1, log=True))
    assert all(1e-3 <= log.sample() <= 1e-1 for _ in range(50))
    optional_int = ex.search_domain("steps_per_epoch", ex.ParamSpec(low=2, high=6))
    assert all(isinstance(optional_int.sample(), int) for _ in range(20))  # int | None field
    q = ex.search_domain("mask_ratio", ex.ParamSpec(low=0.3, high=0.8, step=0.05))
    assert all(abs(v / 0.05 - round(v / 0.05)) < 1e-6 for v in (q.sample() for _ in range(50)))


@pytest.mark.parametrize("name", ["tpe", "random", "qmc"])
def test_stepped_values_are_suggested_and_stored_on_their_grid(name):
    from maenas_ray.orchestration.sampling import decimals

    assert [decimals(x) for x in (0.05, 1e-3, 2.0, 0.3, 12.5)] == [2, 3, 0, 1, 1]
    cfg = load_sweep(None, [f"tune.sampler={name}"])
    study = optuna.create_study(sampler=ex.sampler(cfg))
    for _ in range(40):
        trial = study.ask()
        trial.suggest_float("search/mask_ratio", 0.3, 0.8, step=0.05)
        study.tell(trial, 0.0)
    values = [t.params["search/mask_ratio"] for t in study.trials]  # as Optuna stored them
    assert len(set(values)) > 3 and all(v == round(v, 2) for v in values), values
    # without the rounding Optuna stores 0.3 + 6 * 0.05 = 0.6000000000000001
    assert 0.3 + 6 * 0.05 != 0.6


@pytest.mark.parametrize("name", ["tpe", "random", "qmc", "gp", "grid"])
def test_every_sampler_suggests_points_of_the_space(name):
    overrides = [f"tune.sampler={name}"]
    if name == "grid":
        overrides += ["space={patch_size: {choice: [2, 4]}, decoder_depth: {choice: [1, 2]}}",
                      "tune.num_samples=4"]  # fmt: skip
    cfg = load_sweep(None, overrides)
    study = optuna.create_study(sampler=ex.sampler(cfg))
    seen = set()

    def objective(trial):
        point = tuple(
            trial.suggest_categorical(f"search/{k}", spec.choice)
            if spec.choice is not None
            else trial.suggest_float(f"search/{k}", spec.low, spec.high)
            for k, spec in cfg.space.items()
        )
        seen.add(point)
        return float(len(seen))

    study.optimize(objective, n_trials=4)
    assert len(study.trials) == 4
    if name == "grid":
        assert seen == {(p, d) for p in (2, 4) for d in (1, 2)}  # every combination once


def test_loading_pins_the_reference_masks_and_trials_merge_into_the_base():
    cfg = load_config(None, ["search.mask_ratio=0.6", "search.patch_size=8"])
    assert (cfg.search.eval_mask_ratio, cfg.search.eval_patch_size) == (0.6, 8)
    kept = load_config(None, ["search.eval_mask_ratio=0.4"])
    assert kept.search.eval_mask_ratio == 0.4
    base = cfg.to_dict()
    trial = merge(base, {"search": {"mask_ratio": 0.3}})
    assert trial["search"]["mask_ratio"] == 0.3 and trial["search"]["eval_mask_ratio"] == 0.6
    assert base["search"]["mask_ratio"] == 0.6  # the base is not modified


def test_max_concurrent_trials_follows_the_cluster():
    gpu = load_sweep(None, ["tune.gpus_per_trial=2", "tune.num_samples=32"])
    assert ex.max_concurrent(gpu, {"CPU": 64, "GPU": 32}) == 16
    assert ex.max_concurrent(gpu, {"CPU": 64, "GPU": 3}) == 1
    cpu = load_sweep(None, ["tune.cpus_per_trial=2", "tune.num_samples=3"])
    assert ex.max_concurrent(cpu, {"CPU": 16}) == 3  # never more than num_samples
    assert ex.max_concurrent(cpu, {"CPU": 5}) == 2
    fixed = load_sweep(None, ["tune.max_concurrent_trials=5"])
    assert ex.max_concurrent(fixed, {"CPU": 1}) == 5
    with pytest.raises(ConfigError, match=r"tune.gpus_per_trial = 2: the Ray cluster has 0 GPUs"):
        ex.max_concurrent(gpu, {"CPU": 8})
    # GPU trials are limited by CPUs too (4 per trial, 6 CPUs: one at a time)
    both = load_sweep(None, ["tune.gpus_per_trial=1", "tune.cpus_per_trial=4"])
    assert ex.max_concurrent(both, {"CPU": 6, "GPU": 8}) == 1
    with pytest.raises(ConfigError, match=r"tune.cpus_per_trial = 4: the Ray cluster has 2 CPUs"):
        ex.max_concurrent(both, {"CPU": 2, "GPU": 1})


def test_asha_stops_on_epoch_rungs():
    assert ex.scheduler(load_sweep(None)) is None  # fifo
    cfg = load_sweep(
        None,
        [
            "tune.scheduler=asha",
            "tune.grace_period=5",
            "search.epochs=20",
            "objective.metric=eval_loss",
        ],
    )
    asha = ex.scheduler(cfg)
    assert isinstance(asha, ray.tune.schedulers.AsyncHyperBandScheduler)
    assert asha._time_attr == "epoch"  # the reported epoch, also after a trial restarts
    assert sorted(rung[0] for rung in asha._brackets[0]._rungs) == [5, 10, 20]


def test_trial_resources_are_split_over_its_workers():
    cfg = load_sweep(None, ["tune.gpus_per_trial=4", "tune.cpus_per_trial=8"])
    assert cfg.tune.workers() == 4
    res = worker_resources(cfg)
    assert res["GPU"] == 1 and abs(4 * res["CPU"] + 0.01 - 8) < 1e-9  # + the driver's CPU
    half = load_sweep(None, ["tune.gpus_per_trial=0.5"])
    assert half.tune.workers() == 1 and worker_resources(half)["GPU"] == 0.5
    assert "GPU" not in worker_resources(load_sweep(None))


def test_a_one_worker_trial_runs_in_its_own_process_on_all_its_resources():
    cpu = load_sweep(None, ["tune.cpus_per_trial=3"])
    assert in_trial_process(cpu) and trial_resources(cpu) == {"cpu": 3}
    half = load_sweep(None, ["tune.gpus_per_trial=0.5", "tune.cpus_per_trial=2"])
    assert in_trial_process(half) and trial_resources(half) == {"cpu": 2, "gpu": 0.5}
    # several workers: the trial is a driver, its Train workers reserve the rest
    for sets in (["tune.gpus_per_trial=2"], ["tune.num_workers=2", "tune.cpus_per_trial=2"]):
        dp = load_sweep(None, sets)
        assert not in_trial_process(dp) and trial_resources(dp) == {"cpu": DRIVER_CPU}


def test_prune_checkpoints_keeps_the_newest_epochs(tmp_path):
    import pyarrow.fs

    names = [f"checkpoint_epoch_{e:05d}" for e in (1, 2, 10, 3)] + ["checkpoint_epoch_00010_final"]
    for name in [*names, "other"]:
        (tmp_path / name).mkdir()
    prune_checkpoints(pyarrow.fs.LocalFileSystem(), str(tmp_path), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_epoch_00010", "checkpoint_epoch_00010_final", "other"
    ]  # fmt: skip
    prune_checkpoints(pyarrow.fs.LocalFileSystem(), str(tmp_path / "missing"), 2)  # no error


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "search.mask_rate=0.5"], r"unknown key 'search.mask_rate'"),
        (["--set", "space.mask_ratio.high=1.5"],
         r"space: the trial point .*mask_ratio=1.5.* is invalid: "
         r"search.mask_ratio = 1.5: must be in \(0, 1\)"),
        (["--set", "space.patch_size.choice=[3, 4]"],
         r"space: the trial point .*patch_size=3 is invalid: "
         r"search.patch_size = 3: must divide data.image_size \(16\)"),
        (["--set", "space.mask_ration.low=0.1", "--set", "space.mask_ration.high=0.2"],
         r"space.mask_ration: not a search key"),
        (["--set", "space.decoder_depth.low=1.5"],
         r"space.decoder_depth.low = 1.5: search.decoder_depth is an integer"),
        (["--set", "space.mask_ratio.low=0.9"], r"space.mask_ratio.low = 0.9: must be below high"),
        (["--set", "space.decoder={low: 1, high: 2}"], r"space.decoder = .*takes choice only"),
        (["--set", "space.lr={low: 0, high: 0.1, log: true}"],
         r"space.lr.low = 0.0: must be > 0 with log: true"),
        (["--set", "space={}"], r"space = \{\}: name at least one search key"),
        (["--set", "space.lr={low: 0.01, high: 0.1, log: true, step: 0.01}"],
         r"space.lr.step = 0.01: cannot be combined with log: true"),
        (["--set", "tune.num_workers=2", "--set", "space.batch_size={choice: [8, 9]}"],
         r"batch_size=9 is invalid: search.batch_size = 9: must be divisible by the 2"),
        (["--set", "tune.study_storage=study.db"], r"tune.study_storage = 'study.db': an Optuna"),
        (["--set", "objective.metric=val_loss"],
         r"objective.metric = 'val_loss': is measured with each trial's own masks"),
        (["--set", "objective.metric=accuracy"], r"objective.metric = 'accuracy': allowed: eval"),
        (["--set", "objective.mode=up"], r"objective.mode = 'up': expected one of 'min', 'max'"),
        (["--num-samples", "0"], r"tune.num_samples = 0: must be a positive integer"),
        (["--set", "tune.gpus_per_trial=1.5"], r"tune.gpus_per_trial = 1.5: must be 0, a fraction"),
        (["--set", "tune.num_workers=3"],
         r"search.batch_size = 8: must be divisible by the 3 Ray Train workers"),
        (["--set", "tune.sampler=cmaes"], r"tune.sampler = 'cmaes': expected one of 'tpe'"),
        (["--set", "tune.sampler=grid"], r"tune.sampler = 'grid': needs choice lists in space"),
        (["--set", "tune.sampler=grid", "--set", "space={patch_size: {choice: [4, 8]}}"],
         r"tune.num_samples = 3: the grid of the space has 2 points"),
        (["--name", "a/b"], r"name = 'a/b': letters, digits"),
        (["--resume"], r"--resume: .* holds no sweep experiment"),
        (["--resume", "--set", "tune.seed=2"], r"--resume continues with the config"),
    ],
)  # fmt: skip
def test_bad_input_fails_before_ray_starts(tmp_path, capsys, args, message):
    config = write_config(tmp_path)
    store = tmp_path / "store"
    rc = main(["--config", str(config), "--storage-path", str(store), "--name", "x", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not ray.is_initialized()
    assert not (store / "x").exists() and not (store / "a").exists()


def test_unwritable_storage_and_existing_experiment_are_refused(tmp_path, capsys):
    config = write_config(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = main(["--config", str(config), "--storage-path", str(blocker / "sub")])
    assert rc == 2
    assert "storage_path = " in capsys.readouterr().err
    (tmp_path / "store" / "taken").mkdir(parents=True)
    store = str(tmp_path / "store")
    rc = main(["--config", str(config), "--storage-path", store, "--name", "taken"])
    assert rc == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_storage_uris_resolve_through_pyarrow(tmp_path):
    local = storage.resolve_storage("~/somewhere")
    assert local.is_local and local.uri == os.path.expanduser("~/somewhere")
    uri = storage.resolve_storage(f"file://{tmp_path}/store")
    assert uri.path == f"{tmp_path}/store" and uri.experiment("e").path == f"{tmp_path}/store/e"
    storage.check_writable(uri)
    assert (tmp_path / "store").is_dir() and not list((tmp_path / "store").iterdir())
    with pytest.raises(storage.StorageError, match=r"storage_path = 'nope://x': not a usable URI"):
        storage.resolve_storage("nope://x")


# --- real Ray ---------------------------------------------------------------------------


def _trial_dirs(experiment: Path) -> list[Path]:
    return sorted(experiment.glob("trial_*"))


def _study(experiment: Path, name: str) -> optuna.Study:
    backend = JournalFileBackend(str(experiment / STUDY_JOURNAL))
    return optuna.load_study(study_name=name, storage=JournalStorage(backend))


def _results(experiment: Path) -> ray.tune.ResultGrid:
    cfg = ex.load_sweep_config(storage.resolve_storage(str(experiment)))
    return ray.tune.Tuner.restore(str(experiment), ex.trainable(cfg)).get_results()


def installed_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment (``base``, else this process's, with ``extra``) in which a printed
    command such as ``python -m ...`` or ``optuna-dashboard`` runs as after the README's
    install: the project's environment first on PATH, nothing else installed."""
    base = dict(os.environ if base is None else base)
    bin_dir = Path(sys.executable).parent
    return {**base, "PATH": f"{bin_dir}{os.pathsep}{base.get('PATH', '')}", **extra}


def _serves_the_study(command: list[str], name: str) -> None:
    """Run a printed ``optuna-dashboard <journal>`` on a free port: it serves the study."""
    studies = _serves(command, "/api/studies", lambda page: True, installed_env())
    studies = studies["study_summaries"]
    assert [s["study_name"] for s in studies] == [name]


def _serves(command: list[str], path: str, ready, env: dict) -> Any:
    """Run a server command (``optuna-dashboard``, ``tensorboard``) on a free local port
    until ``path`` answers with JSON that ``ready`` accepts (60 s at most); that JSON."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    page = json.loads(r.read())
                if ready(page):
                    return page
            except OSError:
                assert server.poll() is None, f"{command[0]} exited"
            assert time.monotonic() < deadline, f"{command[0]} did not answer in 60 s"
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sweep_runs_trials_that_open_with_tune_and_optuna(tmp_path, capsys):
    config = write_config(tmp_path)
    store = tmp_path / "store"
    rc = main(["--config", str(config), "--storage-path", str(store), "--name", "it",
               "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    experiment = store / "it"
    results = _results(experiment)
    assert len(results) == 3 and not results.errors
    # two trial processes at a time for three trials: one went on with the third trial
    assert len({r.metrics["pid"] for r in results}) == 2
    study = _study(experiment, "it")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert sorted(t.value for t in study.trials) == sorted(r.metrics["eval_loss"] for r in results)
    assert study.metric_names == ["eval_loss"]  # the dashboard names the objective
    # the dashboard command the sweep prints works as printed (here on a free port)
    (command,) = re.findall(r"^Optuna study: (optuna-dashboard \S+)$", out, re.M)
    _serves_the_study(command.split(), "it")
    for result in results:
        trial = Path(result.path)
        assert trial.parent == experiment and trial.name.startswith("trial_")
        on_disk = Genotype.from_json((trial / "genotype.json").read_text())
        assert on_disk == Genotype.from_json(result.metrics["genotype"])
        for picture in ("reconstruction.png", "alphas.png", "cells.png"):
            assert (trial / picture).stat().st_size > 0
        assert result.metrics["epoch"] == 2 and result.checkpoint is not None
        # tensorboard --logdir <experiment>: Tune's scalars and each epoch's reconstructions
        tb = EventAccumulator(str(trial), size_guidance={"images": 0, "scalars": 0})
        tb.Reload()
        grids = tb.Images(TENSORBOARD_TAG)
        assert [g.step for g in grids] == [1, 2]
        assert grids[0].width > grids[0].height > 16  # 8 images wide, 3 rows high
        assert any(tag.endswith("eval_loss") for tag in tb.Tags()["scalars"])
        # the search ran in the trial process: its checkpoints, as a Train run's, by epoch
        assert sorted(p.name for p in (trial / "search").iterdir()) == [
            "checkpoint_epoch_00001", "checkpoint_epoch_00002"
        ]  # fmt: skip
        assert set(result.config["search"]) == {"mask_ratio", "patch_size", "decoder_depth"}
        assert result.config["search"]["patch_size"] in (4, 8)
        assert 0.3 <= result.config["search"]["mask_ratio"] <= 0.7
        # every trial evaluates with the same reference masks, whatever it searched with
        saved = load_search_state(Path(result.metrics["checkpoint_path"]))
        assert saved["config"]["search"]["eval_mask_ratio"] == 0.5
        assert saved["config"]["search"]["eval_patch_size"] == 4
    _each_checkpoint_stored_once(experiment)
    best = results.get_best_result(metric="eval_loss", mode="min")
    best_genotype = Genotype.from_json(best.metrics["genotype"])
    assert f"best genotype (eval_loss = {best.metrics['eval_loss']:.4g}" in out
    assert repr(best_genotype) in out
    # trials whose masks round to the same patch count train identically: ties are allowed
    tied = {Path(r.path).name.removeprefix("trial_") for r in results
            if r.metrics["eval_loss"] == best.metrics["eval_loss"]}  # fmt: skip
    first_row = out.split("rank  trial")[1].splitlines()[1]
    assert first_row.startswith("1 ") and first_row.split()[1] in tied
    saved = yaml.safe_load((experiment / ex.CONFIG_FILE).read_text())
    assert saved["name"] == "it" and saved["tune"]["num_samples"] == 3
    # read back without Ray: the same best genotype as Ray Tune's own ResultGrid
    from maenas_ray.genotypes import main as genotypes
    from maenas_ray.results import load_experiment

    exp = load_experiment(str(experiment))
    assert len(exp.trials()) == 3 and {t.status for t in exp.trials()} == {"done"}
    ((genotype, score, trial),) = exp.best()
    assert score == best.metrics["eval_loss"] and trial.trial_id in tied
    assert genotype == Genotype.from_json(Path(trial.path, "genotype.json").read_text())
    assert genotypes([str(experiment), "--format", "parquet", "--out", str(tmp_path / "t.pq")]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "t.pq").num_rows == len(results)
    # the report: figures from this sweep's own Optuna journal
    from maenas_ray.report import main as report

    assert f"report: python -m maenas_ray.report {experiment}" in out
    assert report([str(experiment), "--top", "2"]) == 0
    page = (experiment / "report" / "index.html").read_text()
    assert "from the sweep&#x27;s Optuna study: 3 completed trials" in page
    figures = re.findall(r'<img src="([^"]+)"', page)
    best_id = trial.trial_id
    # no score-vs-accuracy scatter: an eval_loss sweep has no accuracy
    assert figures[:5] == [
        "objective_vs_params.png", "history.png", "importances.png", "skips_vs_mask_ratio.png",
        "collapse_over_time.png",
    ]  # fmt: skip
    assert figures[5:7] == [
        f"best/1-trial_{best_id}-cells.png",
        f"best/1-trial_{best_id}-reconstruction.png",
    ]
    assert len(figures) == 9 and all((experiment / "report" / f).stat().st_size for f in figures)
    study_copy = exp.study()
    assert [t.value for t in study_copy.trials] == [t.value for t in study.trials]
    assert not list(experiment.rglob("*.in-use"))  # no scratch lock saved with a checkpoint
    _readme_commands_work(out, experiment, tmp_path)


#: The README's commands, as printed there, that run on this machine against a sweep
#: (``~/maenas_ray_results/<sweep>``); the rest need a GPU, a cluster or a download.
README_COMMANDS = [
    "python -m maenas_ray.genotypes ~/maenas_ray_results/<sweep> --top 3 --format python",
    "python -m maenas_ray.report ~/maenas_ray_results/<sweep>",
    "python -m maenas_ray.retrain --genotype DARTS_V2 --config tune_configs/retrain_quick.yaml",
    "tensorboard --logdir ~/maenas_ray_results/<sweep>",
]


def _readme_commands_work(out: str, experiment: Path, cwd: Path) -> None:
    """Every command the sweep printed and the README's runnable ones exit 0 (servers:
    answer) in the environment the project was installed in, nothing else installed: a
    fresh user's first hour. The retrain prints one line per epoch and none of Ray's."""
    readme = (REPO / "README.md").read_text()
    printed = re.findall(r"^report: (python -m maenas_ray\.report \S+)$", out, re.M)
    commands = [*printed]
    for command in README_COMMANDS:
        assert command in readme, command  # the README still prints it
        commands.append(command.replace("~/maenas_ray_results/<sweep>", str(experiment)))
    env = installed_env(HOME=str(cwd))  # HOME: where the retrain's default storage goes
    trials = len(_trial_dirs(experiment))  # tensorboard: every trial is a run
    for command in commands:
        argv = command.split()
        if argv[0] == "tensorboard":
            _serves(argv, "/data/runs", lambda runs: len(runs) == trials, env)
            continue
        start = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=600)  # fmt: skip
        both = done.stdout + done.stderr
        assert done.returncode == 0, (command, both[-3000:])
        if "retrain" in command:  # "about a minute", one line per epoch, no Ray noise
            assert time.monotonic() - start < 180, command
            assert [both.count(f"epoch {i}/3  train ") for i in (1, 2, 3)] == [1, 1, 1], both
            shown = re.sub(r"\x1b\[[0-9;]*m", "", both)  # as a terminal shows it
            epochs = [line for line in shown.splitlines() if "/3  train " in line]
            assert max(map(len, epochs)) <= 120, epochs  # Ray's worker prefix included
            assert both.count("multiply-adds, epoch 3: top-1") == 1, both  # the result, once
            for noise in ("Reporting training result", "PreemptionWatcher", "Traceback"):
                assert noise not in both, (noise, both[-3000:])
        if "--format python" in command:
            assert done.stdout.count("Genotype(normal=[") == 3


def test_a_trial_runs_data_parallel_over_two_workers(tmp_path, capsys):
    config = write_config(tmp_path, tune={"num_samples": 1, "num_workers": 2, "cpus_per_trial": 2})
    store = tmp_path / "store"
    rc = main(["--config", str(config), "--storage-path", str(store), "--name", "dp",
               "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    (result,) = _results(store / "dp")
    assert result.metrics["epoch"] == 2 and not result.error
    # Ray Train stored the checkpoints; Ray's TuneReportCallback told Tune where, no copy
    assert result.checkpoint is None
    state = load_search_state(Path(result.metrics["checkpoint_path"]))
    assert state["epoch"] == 2 and torch.isfinite(state["model"]["encoder.alphas_normal"]).all()
    assert Path(result.metrics["checkpoint_path"]).parent == Path(result.path) / "search"
    _each_checkpoint_stored_once(store / "dp")


def _each_checkpoint_stored_once(experiment: Path) -> None:
    """No two files in the experiment's checkpoint directories have the same bytes (Tune
    keeps a pointer per trial, not a copy of the stage's checkpoint)."""
    import hashlib

    files = [p for p in experiment.rglob("*") if p.is_file() and "checkpoint_" in str(p)]
    digests = {}
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest not in digests, f"{path} and {digests[digest]} are the same bytes"
        digests[digest] = path
    assert any(p.name == "search_state.pt" for p in files)


def test_latest_search_state_skips_unreadable_checkpoints(tmp_path):
    from maenas_ray.engines import load_search_state as load
    from maenas_ray.engines import save_search_state
    from maenas_ray.runs import latest_state

    fs = storage.resolve_storage(str(tmp_path)).fs

    def latest_search_state(fs, run_dir):
        return latest_state(fs, run_dir, "search_state.pt", load)

    assert latest_search_state(fs, str(tmp_path / "absent")) is None
    from maenas_ray.engines.search import STATE_KEYS

    state = {"format": "maenas-search-v1", **dict.fromkeys(STATE_KEYS, 0), "epoch": 1,
             "model": {"w": torch.ones(3)}}  # fmt: skip
    save_search_state(state, tmp_path / "run" / "checkpoint_2026-01-01_00-00-01.000000")
    newer = save_search_state(
        {**state, "epoch": 2}, tmp_path / "run" / "checkpoint_2026-01-01_00-00-02.000000"
    )
    loaded, path = latest_search_state(fs, str(tmp_path / "run"))
    assert loaded["epoch"] == 2 and path == str(newer)
    newer.write_bytes(newer.read_bytes()[:100])  # truncated by a crash
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*00-00-02.*unreadable"):
        loaded, path = latest_search_state(fs, str(tmp_path / "run"))
    assert loaded["epoch"] == 1 and "00-00-01" in path
    incomplete = {k: v for k, v in state.items() if k != "model"}  # a key missing
    save_search_state(
        {**incomplete, "epoch": 3}, tmp_path / "run" / "checkpoint_2026-01-01_00-00-03.0"
    )
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*00-00-03.*incomplete: no model"):
        loaded, path = latest_search_state(fs, str(tmp_path / "run"))
    assert loaded["epoch"] == 1 and "00-00-01" in path


def test_scratch_directories_no_process_holds_are_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch("artifacts") as mine:  # in use (held by this process)
        held = Path(mine).parent  # mine: a clean sub-directory, without the lock file
        assert held.name.startswith(f"maenas-artifacts-{os.getpid()}-")
        assert Path(mine).name == "artifacts" and list(Path(mine).iterdir()) == []
        for name in ("maenas-ckpt-123-left", "maenas-load-456-left"):  # left by killed ones
            (tmp_path / name).mkdir()
            (tmp_path / name / ".in-use").write_text("")
            (tmp_path / name / "state.pt").write_text("data")
        for name in ("maenas-artifacts-789-new", "unrelated"):  # no lock file: not judged
            (tmp_path / name).mkdir()
        removed = remove_stale_scratch()
        assert sorted(Path(p).name for p in removed) == [
            "maenas-ckpt-123-left", "maenas-load-456-left"
        ]  # fmt: skip
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [held.name, "maenas-artifacts-789-new", "unrelated"]
        )  # fmt: skip
    assert not held.exists()  # removed on exit, as a TemporaryDirectory is


def _scratch_of(pid: int) -> list[str]:
    import tempfile

    return [e.name for e in os.scandir(tempfile.gettempdir())
            if re.match(rf"^maenas-(artifacts|ckpt|load)-{pid}-", e.name)]  # fmt: skip


def test_a_crashed_trial_restarts_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    # the Train worker process of the trial exits right after its epoch-1 checkpoint
    monkeypatch.setenv(FAULT_ENV, "search:exit@1")  # inherited by the Ray started below
    config = write_config(
        tmp_path, search={"epochs": 3}, tune={"num_samples": 1, "checkpoints_to_keep": 10}
    )
    store = tmp_path / "store"
    rc = main(["--config", str(config), "--storage-path", str(store), "--name", "crash",
               "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    assert rc == 0, capsys.readouterr().out
    (result,) = _results(store / "crash")
    trial = Path(result.path)
    assert (trial / "fault-injected-search-exit@1").is_file()  # the fault did happen
    assert result.metrics["epoch"] == 3 and not result.error
    epochs = sorted(
        load_search_state(p)["epoch"]
        for p in glob.glob(str(trial / "search" / "checkpoint_*" / "search_state.pt"))
    )
    assert epochs == [1, 2, 3]  # epoch 1 was not computed again
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    killed = rows[0]["pid"]  # the process that reported epoch 1, then exited
    assert killed != rows[-1]["pid"]
    assert _scratch_of(killed) == []  # its scratch was removed when the trial restarted
    # and the search is the one an uninterrupted run computes (CPU, same seed)
    trial_config = merge(yaml.safe_load((store / "crash" / ex.CONFIG_FILE).read_text()),
                         result.config)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Train worker
    try:
        alone = run_search(config_from_dict(trial_config))
    finally:
        torch.set_num_threads(threads)
    assert alone.genotype == Genotype.from_json(result.metrics["genotype"])
    assert alone.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5)


def test_a_diverging_trial_is_marked_errored_not_scored(tmp_path, capsys):
    # lr 1e10: the reconstruction loss is infinite at the second step of the first epoch
    config = write_config(tmp_path, search={"lr": 1e10, "epochs": 1},
                          tune={"num_samples": 2, "max_failures": 0})  # fmt: skip
    store = tmp_path / "store"
    rc = main(["--config", str(config), "--storage-path", str(store), "--name", "nan",
               "--num-cpus", "2", "--no-dashboard"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "2 trial(s) failed" in out
    from maenas_ray.results import ExperimentError, load_experiment

    exp = load_experiment(str(store / "nan"))
    for trial in exp.trials():
        assert trial.status == "error"
        assert "non-finite reconstruction loss in epoch 1, step 1" in trial.error
        assert not (Path(trial.path) / "search_result.json").exists()  # no result written
    with pytest.raises(ExperimentError):
        exp.best()  # nothing to rank: no score came from a diverged search
    # really errored trials are left out of the label-free score's correlation, and counted
    assert exp.correlation().left_out == {"errored": 2, "unfinished": 0,
                                          "without proxy_top1": 0}  # fmt: skip
    study = _study(store / "nan", "nan")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    from maenas_ray.lock import SweepLock

    with SweepLock(storage.resolve_storage(str(store)).experiment("nan")):
        pass  # released when the sweep ended


def _sweep_command(config, store, *extra):
    return [sys.executable, "-m", "maenas_ray.sweep", "--config", str(config),
            "--storage-path", str(store), "--num-cpus", "2", "--no-dashboard",
            *extra]  # fmt: skip


def test_a_killed_sweep_resumes_without_rerunning_finished_epochs(tmp_path, capsys):
    config = write_config(
        tmp_path, search={"epochs": 3}, tune={"num_samples": 3, "checkpoints_to_keep": 10}
    )
    store = tmp_path / "store"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        _sweep_command(config, store), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, cwd=tmp_path,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    # no --name: the experiment is sweep-<date>-<time>, and --resume finds the newest
    pattern = str(store / "sweep-*" / "trial_*" / "search" / "checkpoint_*" / "search_state.pt")
    while not glob.glob(pattern):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.2)
    # while it runs, the experiment is its own: a --resume of it is refused before Ray
    assert main(_sweep_command(config, store, "--resume")[3:]) == 2
    assert "is in use by a running sweep (host " in capsys.readouterr().err
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    log.close()
    before = {p: os.stat(p).st_mtime_ns for p in glob.glob(pattern)}
    assert before
    (experiment,) = store.glob("sweep-*")

    resumed = subprocess.run(
        _sweep_command(config, store, "--resume"), capture_output=True, text=True,
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming {experiment}" in resumed.stdout
    from maenas_ray.lock import SweepLock

    with SweepLock(storage.resolve_storage(str(experiment))):
        pass  # free: the killed driver's lock went with it, the resumed one released its own
    results = _results(experiment)
    assert len(results) == 3 and not results.errors
    assert all(r.metrics["epoch"] == 3 for r in results)
    assert len(_trial_dirs(experiment)) == 3
    study = _study(experiment, experiment.name)
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for trial in _trial_dirs(experiment):
        epochs = []
        for path in glob.glob(str(trial / "search" / "checkpoint_*" / "search_state.pt")):
            # one cut off by the kill while being written is not a result: skip it
            with contextlib.suppress(ValueError):
                epochs.append(load_search_state(path)["epoch"])
        assert sorted(epochs) == [1, 2, 3], (trial, epochs)  # each epoch computed once
    for path, mtime in before.items():  # checkpoints from before the kill were kept as is
        assert os.stat(path).st_mtime_ns == mtime


@pytest.mark.long  # about 5 minutes: pytest -m long
def test_quickstart_runs_with_no_arguments(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "maenas_ray.sweep"], capture_output=True, text=True,
        cwd=tmp_path, env=env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert time.monotonic() - start < 600
    assert "best genotype" in run.stdout and "Genotype(normal=[" in run.stdout
    (experiment,) = (tmp_path / "maenas_ray_results").glob("quickstart-*")
    assert len(_trial_dirs(experiment)) == 4
    genotypes = [json.loads((t / "genotype.json").read_text()) for t in _trial_dirs(experiment)]
    assert all(Genotype.from_dict(g) for g in genotypes)
    # a default that learns: every trial's α left uniform behind, the eigenvalue was
    # measured, and the proxy accuracy rests on at least 500 held-out images
    for trial in _trial_dirs(experiment):
        final = json.loads((trial / "result.json").read_text().splitlines()[-1])
        assert final["alpha_entropy"] <= 0.95 * math.log(8), (trial, final["alpha_entropy"])
        # the tuned mask ratio is stored on its 0.05 grid (0.6, not 0.6000000000000001)
        ratio = json.loads((trial / "params.json").read_text())["search"]["mask_ratio"]
        assert repr(ratio) == repr(round(ratio, 2)) and abs(ratio * 20 - round(ratio * 20)) < 1e-9
        assert final["proxy_held_out_images"] >= 500
        assert "hessian_eigenvalue" in final
    assert "close to uniform" not in run.stdout
    _printed_and_readme_commands_work(run.stdout, experiment, tmp_path, env)


def _printed_and_readme_commands_work(out: str, experiment: Path, cwd: Path, env) -> None:
    """The default sweep's printed commands and the README's (``_readme_commands_work``),
    and a quick retrain of its best genotype, recorded in the sweep."""
    (command,) = re.findall(r"^Optuna study: (optuna-dashboard \S+)$", out, re.M)
    _serves_the_study(command.split(), experiment.name)
    _readme_commands_work(out, experiment, cwd)
    quick = str(REPO / "tune_configs" / "retrain_quick.yaml")
    argv = f"python -m maenas_ray.retrain --experiment {experiment} --top 1 --config {quick}"
    done = subprocess.run(argv.split(), capture_output=True, text=True, cwd=cwd,
                          env=installed_env(env), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(list((experiment / "retrains").glob("*.json"))) == 1  # recorded in the sweep
    assert "retrain_top1" in subprocess.run(
        [sys.executable, "-m", "maenas_ray.genotypes", str(experiment), "--format", "table"],
        capture_output=True, text=True, check=True,
    ).stdout  # the τ line against the full retrain  # fmt: skip


README_SEARCH = (
    "python -m maenas_ray.search --config tune_configs/search_quick.yaml --out runs/quick"
)


@pytest.mark.slow
def test_the_quick_search_config_moves_alpha_within_about_a_minute(tmp_path):
    """The README's standalone search, run as printed there."""
    assert README_SEARCH in (REPO / "README.md").read_text()
    (tmp_path / "tune_configs").symlink_to(REPO / "tune_configs")
    start = time.monotonic()
    done = subprocess.run(README_SEARCH.split(), capture_output=True, text=True, cwd=tmp_path,
                          env=installed_env(), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - start < 180  # about a minute on 2 free cores
    history = [json.loads(line) for line in (tmp_path / "runs/quick/metrics.jsonl").open()]
    assert history[-1]["alpha_entropy"] <= 0.95 * math.log(8)
    assert [m["epoch"] for m in history if "hessian_eigenvalue" in m] == [2, 4, 6]
    assert "close to uniform" not in done.stdout
    assert (tmp_path / "runs/quick/genotype.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "point",
    [{"mask_ratio": 0.8, "patch_size": 8, "decoder_depth": 3},
     {"mask_ratio": 0.3, "patch_size": 2, "decoder_depth": 1}],
    ids=["fewest-patches-seen", "most-patches-seen"],
)  # fmt: skip
def test_the_quickstart_search_moves_alpha_at_the_corners_of_its_space(point):
    """The default sweep's searches (the whole sweep runs under pytest -m long): at two
    opposite corners of its tuned space, α ends far from uniform."""
    trial = config_from_dict(merge(load_sweep(QUICKSTART).to_dict(), {"search": point}))
    result = run_search(trial)
    assert result.metrics["alpha_entropy"] <= 0.95 * math.log(8), result.metrics
