"""The Optuna sampler of a sweep (``tune.sampler``), its values on their step's grid."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from maenas_ray.config import Config


def decimals(x: float) -> int:
    """Digits after the decimal point of ``x`` as written (0.05 -> 2, 1e-3 -> 3, 2.0 -> 0)."""
    exponent = Decimal(repr(float(x))).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def on_grid(value: Any, dist: BaseDistribution) -> Any:
    """A stepped float rounded to the decimals of its low end and step: Optuna computes
    ``low + k * step``, which gives 0.6000000000000001 for 0.3 + 6 * 0.05."""
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        return round(float(value), max(decimals(dist.low), decimals(dist.step)))
    return value


class OnGrid(optuna.samplers.BaseSampler):
    """``sampler`` with every stepped float it suggests rounded to its grid, before Optuna
    stores it: the study, Tune's ``params.json`` and the exports all hold 0.6, so that
    ``= 0.6`` finds it."""

    def __init__(self, sampler: optuna.samplers.BaseSampler) -> None:
        self.sampler = sampler

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        values = self.sampler.sample_relative(study, trial, search_space)
        return {k: on_grid(v, search_space[k]) for k, v in values.items()}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, name: str, dist: BaseDistribution
    ) -> Any:
        return on_grid(self.sampler.sample_independent(study, trial, name, dist), dist)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()


def sampler(cfg: Config) -> optuna.samplers.BaseSampler:
    """The ``tune.sampler`` of ``cfg``, seeded with ``tune.seed``, on the step grid."""
    t = cfg.tune
    if t.sampler == "random":
        inner: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=t.seed)
    elif t.sampler == "qmc":
        inner = optuna.samplers.QMCSampler(seed=t.seed)
    elif t.sampler == "gp":
        inner = optuna.samplers.GPSampler(seed=t.seed)
    elif t.sampler == "grid":  # sweep_space.check_sweep: choices only, num_samples = grid
        grid = {f"search/{key}": list(spec.choice or ()) for key, spec in cfg.space.items()}
        inner = optuna.samplers.GridSampler(grid, seed=t.seed)
    else:
        inner = optuna.samplers.TPESampler(seed=t.seed)
    return OnGrid(inner)
