"""Reading sweep experiments without Ray: trials, their metrics and genotypes, the best.

``load_experiment(path)`` opens ``<storage_path>/<name>`` on a local or NFS path, ``s3://``
or ``gs://`` (through ``pyarrow.fs``; no Ray cluster needed) and reads what Ray Tune and the
trials wrote there: ``sweep_config.yaml``, each ``trial_<id>/params.json`` (the tuned
values), ``result.json`` (one line per report; the last one is the trial's result),
``genotype.json`` and ``error.txt``, and the Optuna study (``optuna.journal`` or the
configured ``tune.study_storage`` URL). A running experiment (half-written trials) and
errored trials are read as they are: listed, never a crash.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.fs

from maenas_ray.config import Config, ConfigError
from maenas_ray.space import Genotype
from maenas_ray.storage import StorageError, resolve_storage

if TYPE_CHECKING:
    import optuna

CONFIG_FILE = "sweep_config.yaml"
#: the Optuna study of a sweep on local or NFS storage (study name = experiment name)
STUDY_JOURNAL = "optuna.journal"
#: full retrains of a sweep's genotypes (``retrain --experiment``): ``<trial id>.json`` each,
#: the final metrics of that trial's genotype retrained
RETRAINS_DIR = "retrains"
#: the label-free score that the correlation ranks by (lower is better)
LABEL_FREE_SCORE = "eval_loss"


@dataclass
class Correlation:
    """How the label-free score ranks a sweep's trials against an accuracy: Kendall τ and
    Spearman ρ between −eval_loss and the accuracy over the finished trials that have both.

    ``tau`` and the rest are None when there is no number; ``reason`` then says why."""

    accuracy: str  # proxy_top1, or retrain_top1 (full retrains)
    n: int  # trials in the correlation
    tau: float | None = None
    tau_p: float | None = None
    rho: float | None = None
    rho_p: float | None = None
    left_out: dict[str, int] = field(default_factory=dict)  # why trials are not counted
    reason: str | None = None

    def line(self) -> str:
        """One line for the leaderboard, e.g. ``Kendall τ(−eval_loss, proxy_top1) = 0.333
        (Spearman ρ = 0.400, p = 0.75, n = 4 trials)``."""
        what = f"τ(−{LABEL_FREE_SCORE}, {self.accuracy})"
        skipped = ", ".join(f"{n} {why}" for why, n in self.left_out.items() if n)
        tail = f"; left out: {skipped}" if skipped else ""
        if self.tau is None:
            return f"Kendall {what}: no number ({self.reason}){tail}"
        return (
            f"Kendall {what} = {self.tau:.3f} (Spearman ρ = {self.rho:.3f}, p = {self.tau_p:.2g}, "
            f"n = {self.n} trials){tail}"
        )


class ExperimentError(ValueError):
    """The path is not a readable sweep experiment, or a query does not fit it."""


@dataclass
class Trial:
    """One trial as its directory shows it."""

    trial_id: str
    path: str  # the trial directory, inside the experiment's filesystem
    params: dict[str, Any]  # the tuned values, e.g. {"search": {"mask_ratio": 0.6}}
    metrics: dict[str, Any]  # the last reported result; {} before the first report
    status: str  # "done", "unfinished" (running, interrupted, stopped by the scheduler), "error"
    error: str | None = None
    genotype: Genotype | None = None
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def score(self, metric: str) -> float | None:
        """The trial's last value of ``metric``; None when absent or not a number."""
        value = self.metrics.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(value) else None


@dataclass
class Experiment:
    uri: str
    fs: pyarrow.fs.FileSystem
    path: str
    config: Config
    _trials: list[Trial]

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def trials(self) -> list[Trial]:
        return list(self._trials)

    def metrics(self) -> list[str]:
        """The numeric metrics the trials report."""
        names = {
            k for t in self._trials for k, v in t.metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # fmt: skip
        return sorted(names)

    def study(self) -> optuna.Study | None:
        """A read-only copy (in memory) of the sweep's Optuna study: from the configured
        ``tune.study_storage`` URL, else from ``optuna.journal`` in the experiment
        directory; None when the study lived in Ray's memory only (object storage
        without a study URL) or nothing was written yet."""
        import optuna
        from optuna.storages import InMemoryStorage, JournalStorage, RDBStorage
        from optuna.storages.journal import JournalFileBackend

        with tempfile.TemporaryDirectory() as tmp:
            url = self.config.tune.study_storage
            if url is not None:  # the sweep's database, read as it is (no tables created)
                source: Any = RDBStorage(
                    url, skip_table_creation=True, skip_compatibility_check=True
                )
            else:
                journal = _read_bytes(self.fs, f"{self.path}/{STUDY_JOURNAL}")
                if not journal:
                    return None
                # a local copy: nothing is written next to the sweep's own journal (the
                # file backend creates lock files), and remote journals read the same
                copy = os.path.join(tmp, STUDY_JOURNAL)
                with open(copy, "wb") as f:
                    f.write(journal)
                source = JournalStorage(JournalFileBackend(copy))
            names = optuna.get_all_study_names(source)
            # the study is named after the experiment; a renamed directory keeps its one study
            name = self.name if self.name in names or len(names) != 1 else names[0]
            if name not in names:
                return None
            memory = InMemoryStorage()
            optuna.copy_study(from_study_name=name, from_storage=source, to_storage=memory)
        return optuna.load_study(study_name=name, storage=memory)

    def resolve_metric(self, metric: str | None = None, mode: str | None = None) -> tuple[str, str]:
        """``metric`` (default: the sweep's objective) and its ``mode`` (default: the
        objective's mode, else the metric's natural direction), checked against what the
        trials report."""
        from maenas_ray.engines import OBJECTIVES, objective_mode

        metric = metric or self.config.objective.metric
        if mode is None:
            own = metric == self.config.objective.metric
            mode = objective_mode(self.config.objective) if own else OBJECTIVES.get(metric)
        if metric not in self.metrics():
            known = ", ".join(self.metrics()) or "none yet"
            raise ExperimentError(f"unknown metric {metric!r}; the trials report: {known}")
        if mode not in ("min", "max"):
            raise ExperimentError(
                f"mode = {mode!r}: metric {metric!r} has no natural direction; give min or max "
                "(--mode)"
            )
        return metric, mode

    def retrains(self) -> dict[str, dict[str, Any]]:
        """The final metrics of the full retrains of this sweep's genotypes
        (``python -m maenas_ray.retrain --experiment ... --top K``), by trial id."""
        selector = pyarrow.fs.FileSelector(f"{self.path}/{RETRAINS_DIR}", allow_not_found=True)
        found = {}
        for info in self.fs.get_file_info(selector):
            if info.type == pyarrow.fs.FileType.File and info.base_name.endswith(".json"):
                try:
                    found[info.base_name.removesuffix(".json")] = json.loads(
                        _read(self.fs, info.path) or ""
                    )
                except json.JSONDecodeError:
                    continue  # cut short while written: not a result
        return found

    def correlation(self, accuracy: str = "proxy_top1", minimum: int = 3) -> Correlation:
        """Kendall τ and Spearman ρ (with p-values, scipy) between −eval_loss and
        ``accuracy`` over the finished trials that report both: ``proxy_top1`` (the proxy
        objective reports both), or ``retrain_top1``, the final top-1 of the full retrains
        of the trials' genotypes. Errored, unfinished and unscored trials are left out and
        counted; with fewer than ``minimum`` trials there is no number, and the result says
        why."""
        from scipy import stats

        retrained = self.retrains() if accuracy == "retrain_top1" else {}
        left_out = {"errored": 0, "unfinished": 0, f"without {accuracy}": 0}
        pairs = []
        for t in self._trials:
            if t.status != "done":
                left_out["errored" if t.status == "error" else "unfinished"] += 1
                continue
            score = t.score(LABEL_FREE_SCORE)
            if accuracy == "retrain_top1":
                value = retrained.get(t.trial_id, {}).get("top1")
                acc = float(value) if isinstance(value, (int, float)) else None
            else:
                acc = t.score(accuracy)
            if score is None or acc is None or not math.isfinite(acc):
                left_out[f"without {accuracy}"] += 1
                continue
            pairs.append((-score, acc))
        result = Correlation(accuracy, len(pairs), left_out=left_out)
        if len(pairs) < minimum:
            result.reason = (
                f"{len(pairs)} finished trial(s) with both {LABEL_FREE_SCORE} and {accuracy}; "
                f"a rank correlation needs at least {minimum}"
            )
            if (
                not pairs
                and accuracy == "proxy_top1"
                and not self.config.objective.metric.startswith("proxy_")
            ):
                result.reason = (
                    f"the sweep's objective is {self.config.objective.metric}: its trials run "
                    "no proxy retrain, so there is no accuracy (use objective.metric: proxy_top1, "
                    "or retrain the best genotypes with python -m maenas_ray.retrain --experiment)"
                )
            return result
        xs, ys = zip(*pairs, strict=True)
        if len(set(xs)) < 2 or len(set(ys)) < 2:
            result.reason = "every trial has the same score or the same accuracy"
            return result
        tau = stats.kendalltau(xs, ys)
        rho = stats.spearmanr(xs, ys)
        result.tau, result.tau_p = float(tau.statistic), float(tau.pvalue)
        result.rho, result.rho_p = float(rho.statistic), float(rho.pvalue)
        return result

    def best(
        self, k: int = 1, metric: str | None = None, mode: str | None = None
    ) -> list[tuple[Genotype, float, Trial]]:
        """The ``k`` best trials with a genotype by their last ``metric`` (default: the
        sweep's objective), best first, as (genotype, score, trial). Errored trials and
        scores that are missing or not finite (a trial still searching before its proxy
        retrain reports NaN) never rank."""
        metric, mode = self.resolve_metric(metric, mode)
        scored = [
            (t.genotype, score, t)
            for t in self._trials
            if t.status != "error"
            and t.genotype is not None
            and (score := t.score(metric)) is not None
        ]
        if not scored:
            raise ExperimentError(f"no trial of {self.uri} has a genotype and a {metric} yet")
        scored.sort(key=lambda g: g[1] if mode == "min" else -g[1])
        return scored[:k]


def _read_bytes(fs: pyarrow.fs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (FileNotFoundError, OSError):
        return None


def _read(fs: pyarrow.fs.FileSystem, path: str) -> str | None:
    data = _read_bytes(fs, path)
    return None if data is None else data.decode()


def _mtime(fs: pyarrow.fs.FileSystem, path: str) -> float:
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def _json_lines(text: str | None) -> list[dict[str, Any]]:
    rows = []
    for line in (text or "").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line a running trial is still writing
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trial_done(config: Config, params: dict[str, Any], metrics: dict[str, Any]) -> bool:
    """Whether a trial's last result is its final one: the search ran all its epochs (a
    tuned ``search.epochs`` in ``params`` counts) or stopped early (DARTS-ES) and, for a
    proxy objective, the proxy retrain ran too."""
    epochs = params.get("search", {}).get("epochs", config.search.epochs)
    done = metrics.get("epoch") == epochs or metrics.get("stopped_early") is True
    if config.objective.metric.startswith("proxy_"):
        done = done and metrics.get("proxy_epoch") == config.retrain.proxy_epochs
    return done


def load_experiment(path: str, filesystem: pyarrow.fs.FileSystem | None = None) -> Experiment:
    """Open a sweep experiment directory (local, NFS, ``s3://``, ``gs://``), or ``path``
    inside ``filesystem`` (any ``pyarrow.fs`` filesystem) when one is given."""
    import yaml

    from maenas_ray.config import config_from_dict

    if filesystem is not None:
        uri, fs, root = path, filesystem, path.rstrip("/")
    else:
        try:
            storage = resolve_storage(path)
        except StorageError as err:
            raise ExperimentError(str(err)) from None
        uri, fs, root = storage.uri, storage.fs, storage.path
    info = fs.get_file_info(root)
    if info.type != pyarrow.fs.FileType.Directory:
        raise ExperimentError(f"{uri!r} is not a directory (expected a sweep experiment)")
    text = _read(fs, f"{root}/{CONFIG_FILE}")
    if text is None:
        raise ExperimentError(
            f"{uri!r} is not a sweep experiment: no {CONFIG_FILE} (expected "
            "<storage_path>/<name> of python -m maenas_ray.sweep)"
        )
    try:
        config = config_from_dict(yaml.safe_load(text))
    except (ConfigError, yaml.YAMLError) as err:
        raise ExperimentError(f"{uri}/{CONFIG_FILE}: {err}") from None
    trials = []
    entries = fs.get_file_info(pyarrow.fs.FileSelector(root))
    for entry in sorted(entries, key=lambda e: e.base_name):
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("trial_"):
            continue
        tdir = f"{root}/{entry.base_name}"
        params_text = _read(fs, f"{tdir}/params.json")
        try:
            params = json.loads(params_text) if params_text else {}
        except json.JSONDecodeError:
            params = {}
        history = _json_lines(_read(fs, f"{tdir}/result.json"))
        metrics = history[-1] if history else {}
        error = _read(fs, f"{tdir}/error.txt")
        genotype = None
        genotype_text = _read(fs, f"{tdir}/genotype.json") or metrics.get("genotype")
        if genotype_text:
            try:
                genotype = Genotype.from_json(genotype_text)
            except ValueError:
                genotype = None
        done = trial_done(config, params, metrics)
        # Tune keeps error.txt after a restarted trial recovers: an error counts only when
        # nothing was reported after it
        errored = (
            bool(error)
            and not done
            and _mtime(fs, f"{tdir}/error.txt") >= _mtime(fs, f"{tdir}/result.json")
        )
        status = "done" if done else "error" if errored else "unfinished"
        message = error.strip() if errored and error is not None else ""
        trials.append(
            Trial(
                trial_id=str(metrics.get("trial_id") or entry.base_name.removeprefix("trial_")),
                path=tdir,
                params=params,
                metrics=metrics,
                status=status,
                error=message.splitlines()[-1] if message else None,
                genotype=genotype,
                history=history,
            )
        )
    return Experiment(uri, fs, root, config, trials)
