"""Retraining a genotype as a Ray Train job: data parallel (DDP over NCCL on GPUs, gloo on
CPUs) with Ray Train's ``prepare_model``, rank 0 reporting every epoch with a checkpoint to the run
directory ``<storage_path>/<name>``; a rerun with the same storage path and name resumes
from the newest readable checkpoint there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow.fs
import ray.train
import torch
from ray.train.torch import TorchTrainer

from maenas_ray.config import Config, config_from_dict
from maenas_ray.engines.retrain import (
    RETRAIN_FILE,
    RetrainPlan,
    RetrainResult,
    load_retrain_state,
    run_retrain,
    save_retrain_state,
)
from maenas_ray.orchestration.train_jobs import (
    ReportEpochs,
    TuneReports,
    latest_state,
    prepare_model,
    remove_stale_scratch,
    run_config,
    setup_worker,
    torch_config,
)
from maenas_ray.space import Genotype


def retrain_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker loop: one (data-parallel share of a) retraining, resumed if possible."""
    cfg = config_from_dict(loop_config["config"])
    rank = setup_worker(cfg.retrain.device, loop_config["cpus_per_worker"])
    fs, run_dir = loop_config["filesystem"], loop_config["run_dir"]
    reporter = ReportEpochs(rank, "retrain", fs, run_dir.rsplit("/", 1)[0])
    retrain_stage(
        cfg, Genotype.from_json(loop_config["genotype"]), loop_config["proxy"], fs, run_dir,
        reporter, prepare_model=prepare_model,
    )  # fmt: skip


def retrain_stage(
    cfg: Config,
    genotype: Genotype,
    proxy: bool,
    fs: pyarrow.fs.FileSystem,
    run_dir: str,
    reporter: ReportEpochs | TuneReports,
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> RetrainResult:
    """Retrain ``genotype``, resumed from the newest readable checkpoint in ``run_dir``;
    ``reporter`` reports each epoch (in a Train worker or in the Tune trial itself)."""
    remove_stale_scratch()
    state = None
    found = latest_state(fs, run_dir, RETRAIN_FILE, load_retrain_state)
    if found is not None:
        state, path = found
        if reporter.rank == 0:
            print(f"resuming the retraining from epoch {state['epoch']} ({path})", flush=True)
    result = run_retrain(
        cfg, genotype, reporter, proxy=proxy, resume_from=state, prepare_model=prepare_model
    )
    epochs = RetrainPlan.of(cfg, proxy).epochs
    if not proxy and state is not None and state["epoch"] >= epochs:
        # a retrain run (not a sweep's proxy, which replays what Tune lacks before it gets
        # here) that had finished: its result once more, for Train's Result
        reporter.final(result.metrics, lambda d: save_retrain_state(state, d), epochs)
    if proxy and reporter.rank == 0:  # a retrain run's driver prints its own result line
        print(
            f"retrained: {result.parameters:,} parameters, {result.macs / 1e6:.1f}M multiply-adds, "
            f"top-1 {result.metrics.get('top1', float('nan')):.4f}",
            flush=True,
        )
    return result


def retrain_trainer(
    cfg: Config,
    genotype: Genotype,
    *,
    storage_path: str,
    name: str,
    filesystem: pyarrow.fs.FileSystem | None = None,
    proxy: bool = False,
    scaling: ray.train.ScalingConfig | None = None,
    callbacks: list | None = None,
    keep: int = 2,
) -> TorchTrainer:
    """A ``TorchTrainer`` retraining ``genotype`` in ``<storage_path>/<name>``.

    ``scaling`` defaults to the ``retrain`` section (num_workers, use_gpu, cpus_per_worker).
    """
    r = cfg.retrain
    if scaling is None:
        resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
        scaling = ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
        )
    if filesystem is None:
        filesystem, storage_path = pyarrow.fs.FileSystem.from_uri(storage_path)
    cpus = (scaling.resources_per_worker or {}).get("CPU", 1.0)
    return TorchTrainer(
        retrain_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "genotype": genotype.to_json(),
            "proxy": proxy,
            "run_dir": f"{storage_path.rstrip('/')}/{name}",
            "filesystem": filesystem,
            "cpus_per_worker": cpus,
        },
        scaling_config=scaling,
        torch_config=torch_config(),
        run_config=run_config(name, storage_path, filesystem, keep, callbacks or []),
    )
