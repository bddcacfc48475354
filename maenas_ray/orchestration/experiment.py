"""A sweep experiment: storage, the Ray Tune ``Tuner`` with its Optuna outer loop, results.

The experiment directory ``<storage_path>/<name>`` holds Ray Tune's own state (so
``ray.tune.Tuner.restore`` opens it), ``sweep_config.yaml`` (the validated config the
sweep started with), the Optuna study journal ``optuna.journal`` (local or NFS storage;
open it with ``optuna.load_study`` or ``optuna-dashboard``) and one ``trial_<id>``
directory per trial with its checkpoints, Train run, ``genotype.json`` and pictures.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
import uuid
from typing import Any

import optuna
import ray
import ray.tune
import yaml
from ray.tune.search.optuna import OptunaSearch

from maenas_ray.config import (
    Config,
    ConfigError,
    ParamSpec,
    SearchConfig,
    config_from_dict,
    numeric_type,
)
from maenas_ray.orchestration.search_job import in_trial_process, search_trial, trial_resources
from maenas_ray.results import CONFIG_FILE, STUDY_JOURNAL
from maenas_ray.storage import Storage, StorageError, check_writable, resolve_storage

__all__ = ["Storage", "StorageError", "check_writable", "resolve_storage"]  # re-exported


# --- the Tuner ------------------------------------------------------------------------


def search_domain(key: str, spec: ParamSpec) -> Any:
    """The Ray Tune search domain of one ``space`` entry (OptunaSearch converts it)."""
    hints = typing.get_type_hints(SearchConfig)
    if spec.choice is not None:
        return ray.tune.choice(list(spec.choice))
    low, high, step = spec.low, spec.high, spec.step
    assert low is not None and high is not None  # Config.check_sweep guarantees it
    if numeric_type(hints[key]) is int:  # int and int | None fields
        if spec.log:
            return ray.tune.lograndint(int(low), int(high) + 1)
        if step is not None:
            return ray.tune.qrandint(int(low), int(high), int(step))
        return ray.tune.randint(int(low), int(high) + 1)  # randint's upper bound is exclusive
    if spec.log:
        return ray.tune.qloguniform(low, high, step) if step else ray.tune.loguniform(low, high)
    return ray.tune.quniform(low, high, step) if step else ray.tune.uniform(low, high)


def param_space(cfg: Config) -> dict[str, Any]:
    """The Tune parameter space: the tuned search keys as domains, ``{"search": {...}}``.

    The rest of the config reaches every trial through ``tune.with_parameters``, so a
    trial's config (and Tune's tables) shows only what was tuned.
    """
    return {"search": {key: search_domain(key, spec) for key, spec in cfg.space.items()}}


def prepare(cfg: Config) -> Config:
    """The config every trial of a sweep starts from.

    The evaluation masks (the reference objective) are pinned to the config's own mask
    ratio and patch size unless given, so trials that tune the masking stay comparable.
    """
    s = cfg.search
    search = dataclasses.replace(
        s,
        eval_mask_ratio=s.eval_mask_ratio if s.eval_mask_ratio is not None else s.mask_ratio,
        eval_patch_size=s.eval_patch_size if s.eval_patch_size is not None else s.patch_size,
    )
    return dataclasses.replace(cfg, search=search)


def sampler(cfg: Config) -> optuna.samplers.BaseSampler:
    t = cfg.tune
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=t.seed)
    if t.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=t.seed)
    if t.sampler == "gp":
        return optuna.samplers.GPSampler(seed=t.seed)
    if t.sampler == "grid":  # Config.check_sweep: choices only, num_samples = grid size
        grid = {f"search/{key}": list(spec.choice or ()) for key, spec in cfg.space.items()}
        return optuna.samplers.GridSampler(grid, seed=t.seed)
    return optuna.samplers.TPESampler(seed=t.seed)


def scheduler(cfg: Config) -> ray.tune.schedulers.TrialScheduler | None:
    """``asha``: stop trials whose objective trails at epoch rungs; ``fifo``: none."""
    t = cfg.tune
    if t.scheduler != "asha":
        return None
    return ray.tune.schedulers.ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.search.epochs,
        grace_period=min(t.grace_period, cfg.search.epochs),
        reduction_factor=t.reduction_factor,
    )


def study_storage(cfg: Config, experiment: Storage) -> Any:
    """Optuna storage: the configured URL, else a journal file in a local experiment dir."""
    if cfg.tune.study_storage is not None:
        return cfg.tune.study_storage
    if not experiment.is_local:
        return None  # in memory; Ray Tune still checkpoints the searcher with the experiment
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(experiment.join(STUDY_JOURNAL)))


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trainable(cfg: Config) -> Any:
    """The Tune trainable with its resources (``search_job.trial_resources``)."""
    fn = ray.tune.with_parameters(search_trial, base=cfg.to_dict())
    return ray.tune.with_resources(fn, trial_resources(cfg))


def max_concurrent(cfg: Config, resources: dict[str, float]) -> int:
    """Trials at once: as many as the cluster's GPUs (or CPUs) fit, at most num_samples.

    Each trial's Ray Train workers need ``gpus_per_trial`` GPUs and ``cpus_per_trial`` CPUs
    at once; never launching more trials than that avoids trials that hold a driver while
    waiting forever for workers.
    """
    t = cfg.tune
    if t.max_concurrent_trials is not None:
        return t.max_concurrent_trials
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    hint = "or set tune.max_concurrent_trials on an autoscaling cluster"
    if cpus < t.cpus_per_trial:
        raise ConfigError(
            f"tune.cpus_per_trial = {t.cpus_per_trial:g}: the Ray cluster has {cpus:g} CPUs; "
            f"lower it, {hint}"
        )
    fit = math.floor(cpus / t.cpus_per_trial + 1e-9)
    if t.gpus_per_trial > 0:
        if gpus < t.gpus_per_trial:
            raise ConfigError(
                f"tune.gpus_per_trial = {t.gpus_per_trial:g}: the Ray cluster has {gpus:g} "
                f"GPUs; set tune.gpus_per_trial: 0 to search on CPUs, {hint}"
            )
        fit = min(fit, math.floor(gpus / t.gpus_per_trial + 1e-9))
    return max(1, min(fit, t.num_samples))


def build_tuner(cfg: Config, storage: Storage, name: str, concurrency: int) -> ray.tune.Tuner:
    """A new Tuner for the sweep ``cfg``, writing to ``<storage>/<name>``."""
    t = cfg.tune
    experiment = storage.experiment(name)
    metric, mode = cfg.objective.metric, cfg.objective.resolved_mode()
    search_alg = OptunaSearch(
        metric=metric,
        mode=mode,
        sampler=sampler(cfg),
        study_name=name,
        storage=study_storage(cfg, experiment),
    )
    return ray.tune.Tuner(
        trainable(cfg),
        param_space=param_space(cfg),
        tune_config=ray.tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=search_alg,
            scheduler=scheduler(cfg),
            num_samples=t.num_samples,
            max_concurrent_trials=concurrency,
            trial_dirname_creator=trial_dirname,
            # a trial process that ran its search goes on with the next trial: no new
            # process, no second import of torch (Tune starts a fresh one after a crash)
            reuse_actors=in_trial_process(cfg),
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage.uri,
            failure_config=ray.tune.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=t.checkpoints_to_keep),
        ),
    )


def start_ray(address: str | None, num_cpus: int | None, dashboard: bool) -> str | None:
    """Connect to the cluster at ``address``, or start a local Ray (its dashboard bound to
    127.0.0.1); returns the dashboard URL, if any."""
    if address:
        context = ray.init(address=address)
    else:
        context = ray.init(
            num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1"
        )
    return f"http://{context.dashboard_url}" if context.dashboard_url else None


def nodes_missing(path: str) -> list[str]:
    """The alive nodes (by address) that do not see ``path``: one zero-CPU task per node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def sees(p: str) -> bool:
        return os.path.exists(p)

    nodes = [n for n in ray.nodes() if n["Alive"]]
    refs = [
        sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(path)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=120)
    missing = []
    for node, ref in zip(nodes, refs, strict=True):
        try:  # a node that does not answer (busy, going away) counts as not seeing it
            ok = ref in ready and ray.get(ref)
        except ray.exceptions.RayError:
            ok = False
        if not ok:
            missing.append(f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})")
    return missing


def check_shared_storage(storage: Storage) -> None:
    """On a multi-node cluster, a local ``storage_path`` must be one directory that every
    node sees (NFS mounted at the same path): a marker written here must be visible to a
    task on every alive node. Object storage (s3://, gs://) passes as it is."""
    if not storage.is_local or len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    storage.fs.create_dir(storage.path, recursive=True)
    marker = storage.join(f".maenas-shared-{uuid.uuid4().hex}")
    with storage.fs.open_output_stream(marker):
        pass
    try:
        missing = nodes_missing(marker)
    finally:
        storage.fs.delete_file(marker)
    if missing:
        raise StorageError(
            f"storage_path = {storage.uri!r} is node-local: node(s) {', '.join(missing)} of "
            "this multi-node cluster cannot see it; give s3://..., gs://... or a directory on "
            "NFS mounted at the same path on every node"
        )


def restore_tuner(cfg: Config, experiment: Storage) -> ray.tune.Tuner:
    """Continue an interrupted sweep: unfinished and errored trials go on from checkpoints."""
    return ray.tune.Tuner.restore(
        experiment.uri, trainable(cfg), resume_unfinished=True, resume_errored=True
    )


def load_sweep_config(experiment: Storage) -> Config:
    """The config a sweep started with (``sweep_config.yaml`` in its directory)."""
    text = experiment.read_text(CONFIG_FILE)
    return config_from_dict(yaml.safe_load(text), sweep=True)


# --- results --------------------------------------------------------------------------
