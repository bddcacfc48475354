"""A sweep experiment: storage, the Ray Tune ``Tuner`` with its Optuna outer loop, results.

The experiment directory ``<storage_path>/<name>`` holds Ray Tune's own state (so
``ray.tune.Tuner.restore`` opens it), ``sweep_config.yaml`` (the validated config the
sweep started with), the Optuna study journal ``optuna.journal`` (local or NFS storage;
open it with ``optuna.load_study`` or ``optuna-dashboard``) and one ``trial_<id>``
directory per trial with its checkpoints, Train run, ``genotype.json`` and pictures.
"""

from __future__ import annotations

import errno
import json
import math
import os
import typing
import warnings
from pathlib import Path
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
from maenas_ray.engines import objective_mode
from maenas_ray.orchestration.sampling import sampler
from maenas_ray.orchestration.stages import (
    STAGE_KEY,
    in_trial_process,
    search_trial,
    trial_resources,
)
from maenas_ray.results import CONFIG_FILE, STUDY_JOURNAL
from maenas_ray.storage import (
    Storage,
    WholeLinesJournal,
    resolve_storage,
    tune_filesystem,
)
from maenas_ray.sweep_space import check_sweep

# --- the Tuner ------------------------------------------------------------------------


def search_domain(key: str, spec: ParamSpec) -> Any:
    """The Ray Tune search domain of one ``space`` entry (OptunaSearch converts it)."""
    hints = typing.get_type_hints(SearchConfig)
    if spec.choice is not None:
        return ray.tune.choice(list(spec.choice))
    low, high, step = spec.low, spec.high, spec.step
    assert low is not None and high is not None  # sweep_space.check_sweep guarantees it
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

    return JournalStorage(WholeLinesJournal(experiment.join(STUDY_JOURNAL)))


class ConsistentOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that keeps the study and Ray Tune's own state consistent across a
    driver that died between writing one and the other (``--resume``):

    - a trial the study has already finished is neither reported nor told again (Optuna
      would raise ``UpdateFinishedTrialError`` and the resumed sweep could never end);
    - on restore, a trial in Tune's saved state that the searcher's saved state does not
      map (Tune writes the two one after the other; a kill between them tears them) gets
      its study trial back: the running one with its values, else a new one with them;
    - a study trial that Tune's state does not know (asked for after Tune last saved its
      state) is failed as an orphan, and a trial whose directory proves it finished while
      the study still has it running is told its final value;
    - the study names its objective (``set_metric_names``), for the Optuna dashboard.
    """

    _ot_study: optuna.Study | None  # OptunaSearch's own attributes
    _ot_trials: dict[str, optuna.Trial]

    def __init__(self, experiment_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._experiment_uri = experiment_uri

    def _setup_study(self, mode: Any) -> None:
        super()._setup_study(mode)
        if self._ot_study is not None and isinstance(self._metric, str):
            with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and stable
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self._metric])

    def _finished(self, trial_id: str) -> bool:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or self._ot_study is None:
            return False
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        return stored.state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._finished(trial_id):
            return  # reported again after a resume: the study closed it already
        super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if self._finished(trial_id):
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        experiment = resolve_storage(self._experiment_uri)
        if experiment.is_local and self._ot_study is not None:
            self._reload_study(experiment.join(STUDY_JOURNAL))
        self.reconcile()

    def _reload_study(self, journal: str) -> None:
        """The study as its journal holds it, not as pickled with Tune's state: the journal
        may hold more (a trial told after Tune last saved) or, cut by a crash, less."""
        assert self._ot_study is not None
        study = optuna.load_study(
            study_name=self._ot_study.study_name,
            storage=optuna.storages.JournalStorage(WholeLinesJournal(journal)),
            sampler=self._ot_study.sampler,
        )
        known = {t._trial_id for t in study.get_trials(deepcopy=False)}
        self._ot_trials = {
            trial_id: optuna.Trial(study, t._trial_id)
            for trial_id, t in self._ot_trials.items()
            if t._trial_id in known
        }
        self._ot_study, self._storage = study, study._storage

    def reconcile(self) -> list[str]:
        """Bring the study in line with Tune's restored state and the trial directories;
        returns what was changed (one line each, also logged)."""
        from maenas_ray.results import ExperimentError, load_experiment

        if self._ot_study is None:
            return []
        try:
            trials = {t.trial_id: t for t in load_experiment(self._experiment_uri).trials()}
        except ExperimentError:
            trials = {}
        tune = tune_state_trials(resolve_storage(self._experiment_uri))
        changes = self._adopt_torn_trials(tune)
        known = set()
        storage = self._ot_study._storage
        for trial_id, ot_trial in list(self._ot_trials.items()):
            stored = storage.get_trial(ot_trial._trial_id)
            known.add(stored.number)
            trial = trials.get(trial_id)
            if stored.state.is_finished() or trial is None or trial.status != "done":
                continue
            value = trial.score(self._metric) if isinstance(self._metric, str) else None
            state = optuna.trial.TrialState.COMPLETE if value is not None else None
            self._ot_study.tell(ot_trial, value, state=state or optuna.trial.TrialState.FAIL)
            self._completed_trials.add(trial_id)
            changes.append(f"study trial {stored.number}: finished as trial {trial_id} did")
        for stored in self._ot_study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
        ):
            if stored.number not in known:
                storage.set_trial_user_attr(
                    stored._trial_id, "orphan", "asked for after Ray Tune last saved its state"
                )
                storage.set_trial_state_values(stored._trial_id, optuna.trial.TrialState.FAIL)
                changes.append(f"study trial {stored.number}: failed, no Tune trial has it")
        changes += self._set_aside_orphan_directories(trials, tune)
        for change in changes:
            print(f"resume: {change}", flush=True)
        return changes

    def _adopt_torn_trials(self, tune: dict[str, dict[str, Any]]) -> list[str]:
        """Map each trial of Tune's saved state (``tune``: config by trial id) that the
        searcher's saved state lacks to a study trial with its values that no other Tune
        trial has (the one asked for just before the kill), else to a new one with its
        values (enqueued)."""
        assert self._ot_study is not None
        missing = {t: c for t, c in tune.items() if t not in self._ot_trials}
        if not missing or not isinstance(self._space, dict):
            return []
        storage = self._ot_study._storage
        mapped = {storage.get_trial(t._trial_id).number for t in self._ot_trials.values()}
        # running study trials first: the one asked for just before the kill
        free = sorted(
            (
                t
                for t in self._ot_study.get_trials(deepcopy=False)
                if t.number not in mapped and t.state != optuna.trial.TrialState.WAITING
            ),
            key=lambda t: (t.state != optuna.trial.TrialState.RUNNING, t.number),
        )
        changes = []
        for trial_id, config in missing.items():
            try:
                params = {key: _lookup(config, key) for key in self._space}
            except (KeyError, TypeError):
                continue  # not a config of this sweep's space: left to the checks below
            same = [t for t in free if _same_values(t.params, params)]
            if same:
                free.remove(same[0])
                self._ot_trials[trial_id] = optuna.Trial(self._ot_study, same[0]._trial_id)
                how = "taken back"
            else:
                self._ot_study.enqueue_trial(params, skip_if_exists=False)
                self._ot_trials[trial_id] = self._ot_study.ask(fixed_distributions=self._space)
                how = "asked again"
            number = storage.get_trial(self._ot_trials[trial_id]._trial_id).number
            changes.append(
                f"study trial {number}: {how} for trial {trial_id} (in Ray Tune's saved "
                "state, not in its searcher's: the driver died between the two)"
            )
        return changes

    def _set_aside_orphan_directories(
        self, trials: dict[str, Any], tune: dict[str, dict[str, Any]]
    ) -> list[str]:
        """Move the directories of trials Tune's restored state does not know (started after
        it last saved; Tune starts new trials in their place) to ``orphaned/``, out of the
        leaderboard, the report and the correlations."""
        if not trials:
            return []
        experiment = resolve_storage(self._experiment_uri)
        changes = []
        for trial_id, trial in trials.items():
            if trial_id in self._ot_trials or trial_id in tune:
                continue
            name = trial.path.rstrip("/").rsplit("/", 1)[-1]
            experiment.fs.create_dir(experiment.join(ORPHANED_DIR), recursive=True)
            experiment.fs.move(trial.path, experiment.join(ORPHANED_DIR, name))
            changes.append(f"{name}: moved to {ORPHANED_DIR}/, no Tune trial has it")
        return changes


#: Where ``--resume`` moves the directories of trials Tune's saved state never knew.
ORPHANED_DIR = "orphaned"


def tune_state_trials(experiment: Storage) -> dict[str, dict[str, Any]]:
    """The trials of Ray Tune's newest saved state (``experiment_state-*.json``, what
    ``Tuner.restore`` restores), by trial id, each with its config; {} if none is readable."""
    import pyarrow.fs

    infos = experiment.fs.get_file_info(
        pyarrow.fs.FileSelector(experiment.path, allow_not_found=True)
    )
    states = sorted(
        i.base_name for i in infos
        if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")
    )  # fmt: skip
    if not states:
        return {}
    try:
        with experiment.fs.open_input_stream(experiment.join(states[-1])) as f:
            data = json.loads(f.read().decode())
        trials = [json.loads(entry[0]) for entry in data["trial_data"]]
        return {t["trial_id"]: t["config"] for t in trials if isinstance(t["config"], dict)}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def _lookup(config: dict[str, Any], key: str) -> Any:
    """``config["search"]["mask_ratio"]`` for the searcher's key ``search/mask_ratio``."""
    for part in key.split("/"):
        config = config[part]
    return config


def _same_values(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k]) if isinstance(a[k], float) else a[k] == b[k] for k in a
    )


class NoSpaceError(OSError):
    """The sweep's storage is full: the sweep stops with its state as last saved whole,
    to be resumed once there is space."""


def _failed_for_space(trial: Any) -> bool:
    """Whether the last failure of ``trial`` (its error file, in the driver's own staging
    directory, which a full storage does not hold) was a full disk."""
    try:
        text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
    except OSError:
        return False
    return os.strerror(errno.ENOSPC) in text.rsplit("Failure # ", 1)[-1]


class StopWhenFull(ray.tune.Callback):
    """Stops the sweep at the first trial that failed because the storage is full:
    retrying it, or starting the next trials, would only fail the same way and spend their
    ``max_failures``. The failed trial stays unfinished in Tune's state and in the study,
    and ``--resume`` continues it once there is space."""

    def __init__(self, where: str) -> None:
        self.where = where

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if _failed_for_space(trial):
            raise NoSpaceError(errno.ENOSPC, f"no space left on {self.where}")

    on_trial_error = on_trial_recover


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def trainable(cfg: Config) -> Any:
    """The Tune trainable with its resources (``stages.trial_resources``)."""
    fn = ray.tune.with_parameters(search_trial, base=cfg.to_dict())
    fn.__name__ = "trial"  # Tune names trials <name>_<id>: "trial_1a2b3c4d", a narrow column
    return ray.tune.with_resources(fn, trial_resources(cfg))


def max_concurrent(cfg: Config, resources: dict[str, float], where: str = "the Ray cluster") -> int:
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
            f"tune.cpus_per_trial = {t.cpus_per_trial:g}: {where} has {cpus:g} CPUs; "
            f"lower it, {hint}"
        )
    fit = math.floor(cpus / t.cpus_per_trial + 1e-9)
    if t.gpus_per_trial > 0:
        if gpus < t.gpus_per_trial:
            raise ConfigError(
                f"tune.gpus_per_trial = {t.gpus_per_trial:g}: {where} has {gpus:g} "
                f"GPUs; set tune.gpus_per_trial: 0 to search on CPUs, {hint}"
            )
        fit = min(fit, math.floor(gpus / t.gpus_per_trial + 1e-9))
    return max(1, min(fit, t.num_samples))


def build_tuner(cfg: Config, storage: Storage, name: str, concurrency: int) -> ray.tune.Tuner:
    """A new Tuner for the sweep ``cfg``, writing to ``<storage>/<name>``."""
    t = cfg.tune
    experiment = storage.experiment(name)
    metric, mode = cfg.objective.metric, objective_mode(cfg.objective)
    search_alg = ConsistentOptunaSearch(
        experiment.uri,
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
            # a local directory through WholeFiles: a full disk never cuts Tune's state
            storage_path=storage.path if storage.is_local else storage.uri,
            storage_filesystem=tune_filesystem(storage) if storage.is_local else None,
            failure_config=ray.tune.FailureConfig(max_failures=t.max_failures),
            # a trial's checkpoint in Tune is a pointer to its stage's newest (stages.py)
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
            progress_reporter=progress_table(cfg),
            callbacks=[StopWhenFull(experiment.uri)],
            verbose=1,  # the table only: no line per report with every metric
        ),
    )


#: Column headers of the usual tuned keys in the progress table.
SHORT_NAMES = {"mask_ratio": "mask", "patch_size": "patch", "decoder_depth": "depth"}
#: Seconds between two progress tables of a running sweep.
PROGRESS_EVERY_S = 30


def progress_table(cfg: Config) -> ray.tune.CLIReporter:
    """The sweep's progress table, within 120 columns: each trial's tuned values, its stage
    and epoch (``search 4/6``, ``proxy 1/2``), its label-free loss and the objective.
    Ray's default table shows the first metrics a trial happens to report instead.

    It is Tune's classic reporter: the driver sets ``RAY_AIR_NEW_OUTPUT=0``, without which
    Tune ignores it."""
    metric = cfg.objective.metric
    # metric headers on two lines ("eval" over "loss"): no wider than their values
    metrics = {STAGE_KEY: "stage", "eval_loss": "eval\nloss"}
    metrics[metric] = metric.replace("_", "\n", 1)
    params = {f"search/{key}": SHORT_NAMES.get(key, key) for key in cfg.space}
    return ray.tune.CLIReporter(
        metric_columns=metrics,
        parameter_columns=params,
        max_column_length=14,
        max_report_frequency=PROGRESS_EVERY_S,
        sort_by_metric=False,
    )


def restore_tuner(cfg: Config, experiment: Storage) -> ray.tune.Tuner:
    """Continue an interrupted sweep: unfinished and errored trials go on from checkpoints."""
    local = experiment.is_local
    return ray.tune.Tuner.restore(
        experiment.path if local else experiment.uri,
        trainable(cfg),
        resume_unfinished=True,
        resume_errored=True,
        storage_filesystem=tune_filesystem(experiment) if local else None,
    )


def load_sweep_config(experiment: Storage) -> Config:
    """The config a sweep started with (``sweep_config.yaml`` in its directory), checked
    as a new sweep's is."""
    cfg = config_from_dict(yaml.safe_load(experiment.read_text(CONFIG_FILE)))
    check_sweep(cfg)
    return cfg
