"""``python -m maenas_ray.retrain``: supervised retraining of genotypes as Ray Train jobs.

The genotype is a JSON file, a published name (``DARTS_V2``), or the ``--top K`` of a sweep
``--experiment``. Each retraining is data parallel over ``--num-workers`` workers (DDP:
NCCL with ``--use-gpu``, gloo on CPUs) with the ``retrain`` recipe of the config
(docs/method.md §1.6), writes a checkpoint every epoch to ``<storage-path>/<name>``, and
resumes from it when run again with the same storage path and name. Prints parameters,
multiply-adds at the input size and the final held-out accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maenas_ray.cli import (
    STORAGE_ENV,
    UsageError,
    add_ray_arguments,
    check_shared_storage,
    config_overrides,
    connected_ray,
)
from maenas_ray.config import Config, ConfigError, load_config
from maenas_ray.results import RETRAINS_DIR
from maenas_ray.space import PUBLISHED, Genotype
from maenas_ray.storage import StorageError

if TYPE_CHECKING:
    from maenas_ray.results import Experiment


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m maenas_ray.retrain", description=__doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--genotype", help=f"a genotype JSON file or one of {', '.join(PUBLISHED)}")
    which.add_argument("--experiment", help="a sweep experiment directory (with --top)")
    p.add_argument("--top", type=int, default=1, help="retrain the K best genotypes (--experiment)")
    p.add_argument("--config", type=Path, help="YAML config (data and retrain sections)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (retrain.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (retrain.use_gpu)")
    p.add_argument(
        "--storage-path", help=f"where the runs go (default: ${STORAGE_ENV}, else storage_path)"
    )
    p.add_argument(
        "--name", help="run name (default: retrain-<label>-<genotype id>); reuse it to resume"
    )
    add_ray_arguments(p, "retrain.epochs=100")
    return p


def genotype_id(genotype: Genotype) -> str:
    """A short stable id of a genotype (run names of different genotypes never collide)."""
    return hashlib.sha1(genotype.to_json().encode()).hexdigest()[:8]


def read_genotype(spec: str) -> tuple[str, Genotype]:
    """``spec`` is a published name or a JSON file; returns (label, genotype)."""
    if spec in PUBLISHED:
        return spec, PUBLISHED[spec]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(
            f"--genotype {spec!r}: neither a file nor a published genotype ({', '.join(PUBLISHED)})"
        )
    try:
        return path.stem, Genotype.from_json(path.read_text())
    except ValueError as err:
        raise UsageError(f"--genotype {spec!r}: {err}") from None


@dataclass
class Job:
    """One genotype to retrain: its label (the run name's stem) and, for the genotypes of
    a sweep, the sweep and trial it came from (its result is recorded there)."""

    label: str
    genotype: Genotype
    experiment: Experiment | None = None
    trial_id: str | None = None


def top_genotypes(experiment: str, k: int) -> tuple[Config, list[Job]]:
    """The sweep's config and its ``k`` best genotypes (by its objective)."""
    from maenas_ray.results import ExperimentError, load_experiment

    try:
        exp = load_experiment(experiment)
        best = exp.best(k)
    except ExperimentError as err:
        raise UsageError(f"--experiment {experiment!r}: {err}") from None
    return exp.config, [
        Job(f"{exp.name}-top{i}-{t.trial_id}", g, exp, t.trial_id)
        for i, (g, _, t) in enumerate(best, 1)
    ]


def record_retrain(job: Job, metrics: dict[str, Any]) -> None:
    """Write a sweep genotype's final retrain metrics into its experiment
    (``retrains/<trial id>.json``), where the sweep's score-accuracy correlation reads them;
    written to a temporary name, then moved, so a cut write never leaves a result."""
    if job.experiment is None or job.trial_id is None:
        return
    exp = job.experiment
    folder = f"{exp.path}/{RETRAINS_DIR}"
    exp.fs.create_dir(folder, recursive=True)
    final = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    tmp = f"{folder}/.{job.trial_id}.json.tmp"
    with exp.fs.open_output_stream(tmp) as f:
        f.write((json.dumps({**final, "genotype": job.genotype.to_json()}) + "\n").encode())
    exp.fs.move(tmp, f"{folder}/{job.trial_id}.json")


def main(argv: list[str] | None = None) -> int:
    from maenas_ray.engines import check_registered
    from maenas_ray.storage import check_writable, resolve_storage
    from maenas_ray.sweep_space import name_problem

    args = _parser().parse_args(argv)
    overrides = config_overrides(args)
    if args.num_workers is not None:
        overrides.append(f"retrain.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("retrain.use_gpu=true")
    try:
        if args.top < 1:
            raise UsageError(f"--top {args.top}: must be >= 1")
        if args.experiment:
            sweep_cfg, jobs = top_genotypes(args.experiment, args.top)
            cfg = load_config(args.config, overrides) if args.config else None
            if cfg is None:
                from maenas_ray.config import apply_overrides, config_from_dict

                cfg = config_from_dict(apply_overrides(sweep_cfg.to_dict(), overrides))
        else:
            cfg = load_config(args.config, overrides)
            jobs = [Job(*read_genotype(args.genotype))]
        if args.name and len(jobs) > 1:
            raise UsageError("--name names one run; leave it out with --top > 1")
        problem = name_problem(args.name) if args.name else None
        if problem is not None:
            raise UsageError(f"--name {args.name!r}: {problem}")

        check_registered(cfg)
        cfg.check_retrain()
        if not args.address:
            check_local_gpus(cfg)
        storage = resolve_storage(cfg.storage_path)
        check_writable(storage)
    except (ConfigError, UsageError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _run(args, cfg, storage, jobs)


def gpu_shortage(cfg: Config, available: float, where: str) -> str | None:
    """Why ``retrain.use_gpu`` cannot be served by ``available`` GPUs (one per worker), or
    None. Ray would otherwise wait for them for ever."""
    r = cfg.retrain
    if not r.use_gpu or available >= r.num_workers:
        return None
    return (
        f"retrain.use_gpu = true needs {r.num_workers} GPU(s), one per worker "
        f"(retrain.num_workers = {r.num_workers}); {where} has {available:g}: "
        "leave out --use-gpu to retrain on CPUs"
    )


def check_local_gpus(cfg: Config) -> None:
    """Before a local Ray starts: this machine has the GPUs ``retrain.use_gpu`` asks for."""
    if cfg.retrain.use_gpu:
        import torch

        problem = gpu_shortage(cfg, torch.cuda.device_count(), "this machine")
        if problem:
            raise UsageError(problem)


def _run(args: argparse.Namespace, cfg: Config, storage, jobs: list[Job]) -> int:
    import ray

    with connected_ray(args) as connected:
        if not connected:
            return 2
        problem = gpu_shortage(cfg, ray.cluster_resources().get("GPU", 0.0), "the Ray cluster")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        try:
            check_shared_storage(storage)
        except StorageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        failed = sum(not _retrain(args, cfg, storage, job) for job in jobs)
    return 1 if failed else 0


def _retrain(args: argparse.Namespace, cfg: Config, storage, job: Job) -> bool:
    """One retraining as a Ray Train job; False (error printed) when it failed."""
    import ray.train

    from maenas_ray.orchestration.stages import Run, stage_trainer

    label, genotype = job.label, job.genotype
    name = args.name or f"retrain-{label}-{genotype_id(genotype)}"
    run = storage.experiment(name)
    print(f"retraining {label} -> {run.uri}\n  {genotype!r}", flush=True)
    run_dir = f"{storage.path.rstrip('/')}/{name}"
    r = cfg.retrain
    resources = {"CPU": r.cpus_per_worker, **({"GPU": 1} if r.use_gpu else {})}
    scaling = ray.train.ScalingConfig(
        num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources
    )
    trainer = stage_trainer(Run("retrain", cfg, storage.fs, run_dir, genotype), scaling, keep=2)
    try:
        result = trainer.fit()
    except Exception as err:  # the job's error, named; the other jobs go on
        print(f"error: retraining {label} failed: {err}", file=sys.stderr)
        return False
    m = result.metrics or {}
    record_retrain(job, m)
    print(
        f"{label}: {m.get('parameters', 0):,} parameters, "
        f"{m.get('macs', 0) / 1e6:.1f}M multiply-adds, epoch {m.get('epoch')}: "
        f"top-1 {m.get('top1', float('nan')):.4f}, top-5 {m.get('top5', float('nan')):.4f}",
        flush=True,
    )
    return True


if __name__ == "__main__":
    sys.exit(main())
