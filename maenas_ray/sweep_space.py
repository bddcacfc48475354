"""What a sweep (``python -m maenas_ray.sweep``) needs of its config on top of
:meth:`Config.check <maenas_ray.config.Config.check>`, and the names of experiments and runs.

:func:`check_sweep`: the registered names (``engines.check_registered``), the experiment
name, the storage path, the trial resources, the objective against the scheduler and the
tuned ``space`` (every key a search key, every spec fitting its key's type, every corner
of the space a valid search). The sweep command runs it before Ray starts, and
``load_sweep_config`` when a sweep resumes. No Ray here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from maenas_ray.config import (
    Config,
    ConfigError,
    SearchConfig,
    coerce,
    fail,
    load_config,
    numeric_type,
    suggest,
)
from maenas_ray.engines import check_registered

#: An experiment or run name: a directory name under the storage path.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The longest experiment / run name: a directory name, with room for Tune's own suffixes.
MAX_NAME = 200


def name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as an experiment or run name (:data:`NAME`,
    :data:`MAX_NAME`), or None."""
    if not NAME.fullmatch(name):
        return "letters, digits, '.', '_' and '-' only"
    if len(name) > MAX_NAME:
        return f"at most {MAX_NAME} characters"
    return None


def load_sweep(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """A sweep's config: :func:`~maenas_ray.config.load_config` and :func:`check_sweep`."""
    cfg = load_config(path, overrides)
    check_sweep(cfg)
    return cfg


def check_sweep(cfg: Config) -> None:
    """The checks of a sweep on top of :meth:`Config.check`: the registered names, the
    experiment name, workers, the proxy retrain and the tuned space."""
    check_registered(cfg)
    cfg.check_search_splits()
    _check_workers(cfg, "search")
    problem = None if cfg.name is None else name_problem(cfg.name)
    if problem is not None:
        fail("name", cfg.name, f"{problem} (a directory name)")
    if not cfg.storage_path:
        fail("storage_path", cfg.storage_path, "a directory or an s3:// or gs:// URI")
    if not cfg.space:
        fail("space", cfg.space, "name at least one search key to tune")
    _check_space(cfg)
    metric = cfg.objective.metric
    if metric.startswith("proxy_"):
        if cfg.tune.scheduler == "asha":
            fail(
                "tune.scheduler",
                "asha",
                f"stops trials on search epochs; objective.metric = "
                f"{metric!r} exists only after the proxy retrain: use fifo",
            )
        _check_workers(cfg, "retrain")
        cfg.check_network(proxy=True)
        _check_proxy_split(cfg)
    tuned_masks = sorted({"mask_ratio", "patch_size"} & set(cfg.space))
    if metric in ("val_loss", "val_psnr") and tuned_masks:
        fail(
            "objective.metric",
            metric,
            f"is measured with each trial's own masks, and space tunes {tuned_masks}: "
            "trials would not compare; use eval_loss or eval_psnr (fixed reference masks)",
        )
    if cfg.tune.sampler == "grid":
        ranges = [k for k, spec in cfg.space.items() if spec.choice is None]
        if ranges:
            fail("tune.sampler", "grid", f"needs choice lists in space, not ranges ({ranges})")
        points = math.prod(len(spec.choice or ()) for spec in cfg.space.values())
        if cfg.tune.num_samples != points:
            fail(
                "tune.num_samples",
                cfg.tune.num_samples,
                f"the grid of the space has {points} points; run each once",
            )


def _check_workers(cfg: Config, section: str) -> None:
    """The batch of ``section`` (search, or the proxy retrain's) splits over the Ray Train
    workers of a trial."""
    workers = cfg.tune.workers()
    batch_size = getattr(cfg, section).batch_size
    if batch_size % workers:
        fail(
            f"{section}.batch_size",
            batch_size,
            f"must be divisible by the {workers} Ray Train workers of a trial",
        )


def _check_proxy_split(cfg: Config) -> None:
    """The proxy retrain's training images hold a retrain batch."""
    known = cfg.known_size()
    if known is None:
        return
    key, n = known
    train = n - max(1, int(n * cfg.retrain.proxy_val_fraction))
    if train < cfg.retrain.batch_size:
        fail(
            key, n, f"the proxy retrain would train on {train} images, fewer than "
            f"retrain.batch_size ({cfg.retrain.batch_size})",
        )  # fmt: skip


def _check_space(cfg: Config) -> None:
    """Every tuned key exists, its spec fits its type, and the extremes are valid."""
    hints = typing.get_type_hints(SearchConfig)
    corners: list[list[tuple[str, Any]]] = []
    for key, spec in cfg.space.items():
        where = f"space.{key}"
        if key not in hints:
            names = ", ".join(f.name for f in dataclasses.fields(SearchConfig))
            raise ConfigError(
                f"{where}: not a search key; tunable keys: {names}{suggest(key, hints)}"
            )
        tp = hints[key]
        if spec.choice is not None:
            if spec.low is not None or spec.high is not None:
                fail(where, dataclasses.asdict(spec), "give either low/high or choice")
            if not spec.choice:
                fail(f"{where}.choice", spec.choice, "must list at least one value")
            values = [coerce(tp, v, f"{where}.choice") for v in spec.choice]
        else:
            if spec.low is None or spec.high is None:
                fail(where, dataclasses.asdict(spec), "needs low and high, or choice")
            number = numeric_type(tp)
            if not number:
                fail(where, dataclasses.asdict(spec), f"search.{key} takes choice only")
            if spec.low >= spec.high:
                fail(f"{where}.low", spec.low, f"must be below high ({spec.high})")
            if spec.log and spec.low <= 0:
                fail(f"{where}.low", spec.low, "must be > 0 with log: true")
            if spec.log and spec.step is not None:
                fail(f"{where}.step", spec.step, "cannot be combined with log: true")
            if spec.step is not None and spec.step <= 0:
                fail(f"{where}.step", spec.step, "must be > 0")
            if number is int:
                for bound in ("low", "high", "step"):
                    v = getattr(spec, bound)
                    if v is not None and v != int(v):
                        fail(f"{where}.{bound}", v, f"search.{key} is an integer")
            values = [number(spec.low), number(spec.high)]
        corners.append([(key, v) for v in values])
    # a trial's config is the sweep's with the tuned search keys replaced (its evaluation
    # masks stay the sweep's own): only the search section differs from ``cfg``
    for combo in itertools.islice(itertools.product(*corners), 512):
        trial = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **dict(combo)))
        try:
            trial.check()
            trial.check_search_splits()
            _check_workers(trial, "search")
        except ConfigError as err:
            point = ", ".join(f"{k}={v!r}" for k, v in combo)
            raise ConfigError(f"space: the trial point {point} is invalid: {err}") from None
