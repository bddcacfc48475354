"""Engines: the search loop and the retrain loop. Pure torch, no Ray."""

from maenas_ray.engines.hessian import dominant_eigenvalue, exact_fp32
from maenas_ray.engines.search import (
    CHECKPOINT_FILE,
    SEARCH_OBJECTIVES,
    CheckpointMismatchError,
    EpochReport,
    SearchCallback,
    SearchLoop,
    SearchResult,
    average_over_ranks,
    load_search_state,
    rank_and_world,
    resolve_device,
    run_search,
    save_search_state,
    unrolled_arch_gradients,
)

#: Final trial metrics a sweep may optimise, with their natural direction: the label-free
#: search metrics, and the held-out accuracy of the proxy retrain (labels used there only).
OBJECTIVES = {**SEARCH_OBJECTIVES, "proxy_top1": "max", "proxy_top5": "max"}

__all__ = [
    "CHECKPOINT_FILE",
    "OBJECTIVES",
    "CheckpointMismatchError",
    "EpochReport",
    "SearchCallback",
    "SearchLoop",
    "SearchResult",
    "average_over_ranks",
    "dominant_eigenvalue",
    "exact_fp32",
    "load_search_state",
    "rank_and_world",
    "resolve_device",
    "run_search",
    "save_search_state",
    "unrolled_arch_gradients",
]
