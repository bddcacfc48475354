"""Engines: the search loop and the retrain loop. Pure torch, no Ray.

Also the registry of objectives (:data:`OBJECTIVES`), with the check of a config's
``objective`` section against it, and :func:`check_registered`, every registered name of
a config, which the command lines run after loading it.
"""

from maenas_ray.config import Config, ObjectiveSection, fail, not_one_of
from maenas_ray.data import check_dataset
from maenas_ray.engines.architect import unrolled_arch_gradients
from maenas_ray.engines.common import (
    CheckpointMismatchError,
    EpochReport,
    SearchCallback,
    average_over_ranks,
    rank_and_world,
    resolve_device,
)
from maenas_ray.engines.hessian import dominant_eigenvalue, exact_fp32
from maenas_ray.engines.search import (
    CHECKPOINT_FILE,
    SEARCH_OBJECTIVES,
    SearchLoop,
    SearchResult,
    load_search_state,
    run_search,
    save_search_state,
)

#: Final trial metrics a sweep may optimise, with their natural direction: the label-free
#: search metrics, and the held-out accuracy of the proxy retrain (labels used there only).
OBJECTIVES = {**SEARCH_OBJECTIVES, "proxy_top1": "max", "proxy_top5": "max"}


def check_objective(objective: ObjectiveSection) -> None:
    """``objective.metric`` is one of :data:`OBJECTIVES`, and ``objective.mode``, if
    given, is its natural direction."""
    if objective.metric not in OBJECTIVES:
        not_one_of("objective.metric", objective.metric, OBJECTIVES)
    natural = OBJECTIVES[objective.metric]
    if objective.mode is not None and objective.mode != natural:
        fail(
            "objective.mode",
            objective.mode,
            f"objective.metric = {objective.metric!r} is optimised with mode {natural!r}; "
            f"drop objective.mode (it follows the metric) or set it to {natural!r}",
        )


def objective_mode(objective: ObjectiveSection) -> str:
    """The direction the objective is optimised in: its mode, else its metric's natural one."""
    return objective.mode or OBJECTIVES[objective.metric]


def check_registered(cfg: Config) -> None:
    """The names ``cfg`` picks from registries: ``data.dataset`` (``data.DATASETS``) and
    the objective (:data:`OBJECTIVES`). A :class:`~maenas_ray.config.ConfigError` names
    the key, the value and what is allowed."""
    check_dataset(cfg.data)
    check_objective(cfg.objective)


__all__ = [
    "CHECKPOINT_FILE",
    "OBJECTIVES",
    "CheckpointMismatchError",
    "EpochReport",
    "SearchCallback",
    "SearchLoop",
    "SearchResult",
    "average_over_ranks",
    "check_objective",
    "check_registered",
    "dominant_eigenvalue",
    "exact_fp32",
    "load_search_state",
    "objective_mode",
    "rank_and_world",
    "resolve_device",
    "run_search",
    "save_search_state",
    "unrolled_arch_gradients",
]
