"""One sweep trial: a Ray Tune function that runs one MAE-DARTS search (and, with the
``proxy_top1`` objective, a short proxy retrain of the found genotype).

- **One worker** (one GPU, a GPU fraction, or CPUs only): ``search_trial`` runs the search
  in the Tune trial process itself, on the resources Tune reserved for the trial. Each
  epoch's checkpoint is written to ``<trial>/search/checkpoint_epoch_<n>`` and reported to
  Ray Tune with it.
- **Several workers** (``gpus_per_trial`` > 1, or ``tune.num_workers``): ``search_trial``
  is a lightweight driver that starts a data-parallel ``TorchTrainer`` on the trial's
  resources. Rank 0 reports every epoch to Ray Train with a checkpoint in the same
  ``<trial>/search`` directory; a Train callback hands each report to the driver, which
  reports it to Ray Tune.

Either way the runs live in the trial directory (``<trial>/search``, ``<trial>/proxy``), so a
restarted trial (Tune ``FailureConfig`` or ``--resume``) continues from its last checkpoints,
and a search that had finished is not run again. At the end of the search rank 0 copies
``genotype.json``, ``search_result.json`` and the pictures into the trial directory on the
storage (local, NFS, s3:// or gs://).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer

from maenas_ray.config import Config, config_from_dict
from maenas_ray.engines import (
    CHECKPOINT_FILE,
    load_search_state,
    run_search,
)
from maenas_ray.orchestration.train_jobs import (
    ForwardReports,
    ReportEpochs,
    TuneReports,
    latest_state,
    remove_stale_scratch,
    replay_unreported,
    require_visible,
    run_config,
    scratch,
    setup_worker,
    torch_config,
    upload,
    use_cpus,
)
from maenas_ray.results import CONFIG_FILE

#: Sub-directories of a trial directory holding its Ray Train runs.
SEARCH_RUN = "search"
PROXY_RUN = "proxy"
#: CPU the trial driver itself reserves; taken out of ``tune.cpus_per_trial``.
DRIVER_CPU = 0.01
#: The search's final metrics (JSON), written with the artifacts: the stage is done.
SEARCH_RESULT = "search_result.json"
#: Files every finished search writes into its trial directory; the result last, as it
#: marks the stage done.
ARTIFACTS = ("genotype.json", "reconstruction.png", "alphas.png", "cells.png", SEARCH_RESULT)
#: The result key saying where a trial stands (``search 4/6``, ``proxy 1/2``): the
#: progress table's stage column (Tune's iteration counts the two stages together).
STAGE_KEY = "stage"


def worker_resources(cfg: Config) -> dict[str, float]:
    """Resources of one Ray Train worker: the trial's share, minus the driver's CPU."""
    workers = cfg.tune.workers()
    resources = {"CPU": (cfg.tune.cpus_per_trial - DRIVER_CPU) / workers}
    if cfg.tune.gpus_per_trial > 0:
        resources["GPU"] = cfg.tune.gpus_per_trial / workers
    return resources


def search_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: one (data-parallel share of a) search, resumed if possible."""
    cfg = config_from_dict(loop_config["config"])
    rank = setup_worker(cfg.search.device, worker_resources(cfg)["CPU"])
    fs, trial_dir = loop_config["filesystem"], loop_config["trial_dir"]
    # a worker may run on another node than its trial: it checks the storage itself
    require_visible(fs, f"{trial_dir.rsplit('/', 1)[0]}/{CONFIG_FILE}", "the sweep's config")
    search_stage(cfg, fs, trial_dir, ReportEpochs(rank, "search", fs, trial_dir))


def search_stage(
    cfg: Config, fs: pyarrow.fs.FileSystem, trial_dir: str, reporter: ReportEpochs | TuneReports
) -> None:
    """The search of a trial, resumed from the newest readable checkpoint in
    ``<trial_dir>/search``; ``reporter`` reports each epoch (in a Train worker or in the Tune
    trial itself). Rank 0 copies the genotype, pictures and final metrics to ``trial_dir``."""
    rank = reporter.rank
    state = None
    found = latest_state(fs, f"{trial_dir}/{SEARCH_RUN}", CHECKPOINT_FILE, load_search_state)
    if found is not None:
        state, path = found
        if rank == 0:
            print(f"resuming the search from epoch {state['epoch']} ({path})", flush=True)
    remove_stale_scratch()
    with scratch("artifacts") as out:
        # a search that had finished before the restart reports nothing: the trial replayed
        # what Tune had not recorded before it got here (replay_unreported)
        result = run_search(cfg, reporter, resume_from=state, out_dir=out if rank == 0 else None)
        if rank == 0:
            (Path(out) / SEARCH_RESULT).write_text(json.dumps(result.metrics) + "\n")
            upload(Path(out), ARTIFACTS, fs, trial_dir)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the (nested) keys of ``update`` set."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def search_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune trainable: the sweep's ``base`` config with this trial's tuned ``params``
    (e.g. ``{"search": {"mask_ratio": 0.6}}``): its search, then, for the ``proxy_*``
    objectives, the proxy retrain of the derived genotype.

    A one-worker trial runs both in this process, on the resources Tune gave the trial; a
    data-parallel one (several workers) runs each as a Ray Train job."""
    # Tune's line per stored checkpoint would repeat the progress table in the driver's log
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    try:
        _trial(params, base)
    finally:
        if torch.cuda.is_available():  # the process may go on with another trial
            torch.cuda.empty_cache()  # (reuse_actors): its cached GPU memory goes back


def _trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    config = merge(base, params)
    cfg = config_from_dict(config)
    storage = ray.tune.get_context().get_storage()
    trial_dir, fs = storage.trial_fs_path, storage.storage_filesystem
    require_visible(fs, f"{storage.experiment_fs_path}/{CONFIG_FILE}", "the sweep's config")
    proxy = cfg.objective.metric.startswith("proxy_")
    in_trial = in_trial_process(cfg)
    if in_trial:
        use_cpus(cfg.tune.cpus_per_trial)
    keep = cfg.tune.checkpoints_to_keep
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.tune.workers(),
        use_gpu=cfg.tune.gpus_per_trial > 0,
        resources_per_worker=worker_resources(cfg),
    )
    # Tune needs the objective in every result: a placeholder until the proxy has one
    placeholder = {cfg.objective.metric: float("nan")} if proxy else {}

    def searching(m: dict[str, Any]) -> dict[str, Any]:
        return {**m, **placeholder, STAGE_KEY: f"search {m['epoch']}/{cfg.search.epochs}"}

    # epochs whose checkpoints reached the storage but whose reports did not reach Tune
    replay_unreported(fs, f"{trial_dir}/{SEARCH_RUN}", CHECKPOINT_FILE, load_search_state,
                      searching)  # fmt: skip
    search = _read_json(fs, f"{trial_dir}/{SEARCH_RESULT}")
    if search is None:  # not done yet (a restarted trial whose search finished skips it)
        if in_trial:
            run_dir = f"{trial_dir}/{SEARCH_RUN}"
            reporter = TuneReports("search", fs, run_dir, keep, searching)
            search_stage(cfg, fs, trial_dir, reporter)
        else:
            forward = ForwardReports()
            trainer = TorchTrainer(
                search_worker,
                train_loop_config={"config": config, "trial_dir": trial_dir, "filesystem": fs},
                scaling_config=scaling,
                torch_config=torch_config(),
                run_config=run_config(SEARCH_RUN, trial_dir, fs, keep, [forward]),
            )
            forward.fit_and_report_to_tune(trainer, searching)
        search = _read_json(fs, f"{trial_dir}/{SEARCH_RESULT}")
        if search is None:
            raise RuntimeError(f"the search ended without writing {trial_dir}/{SEARCH_RESULT}")
    if not proxy:
        return
    from maenas_ray.engines.retrain import RETRAIN_FILE, load_retrain_state
    from maenas_ray.orchestration.retrain_job import retrain_stage, retrain_trainer
    from maenas_ray.space import Genotype

    genotype = Genotype.from_json(search["genotype"])

    def with_search(metrics: dict[str, Any]) -> dict[str, Any]:
        stage = f"proxy {metrics['epoch']}/{cfg.retrain.proxy_epochs}"
        return {**search, **{f"proxy_{k}": v for k, v in metrics.items()}, STAGE_KEY: stage}

    replay_unreported(fs, f"{trial_dir}/{PROXY_RUN}", RETRAIN_FILE, load_retrain_state,
                      with_search)  # fmt: skip
    if in_trial:
        run_dir = f"{trial_dir}/{PROXY_RUN}"
        reporter = TuneReports("retrain", fs, run_dir, keep, with_search)
        retrain_stage(cfg, genotype, True, fs, run_dir, reporter)
        return
    forward = ForwardReports()
    trainer = retrain_trainer(
        cfg, genotype, storage_path=trial_dir, name=PROXY_RUN, filesystem=fs, proxy=True,
        scaling=scaling, callbacks=[forward], keep=keep,
    )  # fmt: skip
    forward.fit_and_report_to_tune(trainer, with_search)


def in_trial_process(cfg: Config) -> bool:
    """Whether a trial runs its search (and proxy retrain) in the Tune trial process itself:
    with one worker there is nothing to distribute, and a Ray Train job would only add its
    controller, worker process and process group to every trial."""
    return cfg.tune.workers() == 1


def trial_resources(cfg: Config) -> dict[str, float]:
    """What the Tune trial itself reserves: all of the trial's CPUs and GPUs when it runs
    in its own process, else only the driver's share (the Train workers get their own)."""
    if not in_trial_process(cfg):
        return {"cpu": DRIVER_CPU}
    resources = {"cpu": cfg.tune.cpus_per_trial}
    if cfg.tune.gpus_per_trial > 0:
        resources["gpu"] = cfg.tune.gpus_per_trial
    return resources
