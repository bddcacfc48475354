"""Engines: the search loop (and, later, the retrain loop). Pure torch, no Ray."""

from maenas_ray.engines.search import (
    CHECKPOINT_FILE,
    OBJECTIVES,
    CheckpointMismatchError,
    EpochReport,
    SearchCallback,
    SearchResult,
    average_over_ranks,
    load_search_state,
    rank_and_world,
    resolve_device,
    run_search,
    save_search_state,
    unrolled_arch_gradients,
)

__all__ = [
    "CHECKPOINT_FILE",
    "OBJECTIVES",
    "CheckpointMismatchError",
    "EpochReport",
    "SearchCallback",
    "SearchResult",
    "average_over_ranks",
    "load_search_state",
    "rank_and_world",
    "resolve_device",
    "run_search",
    "save_search_state",
    "unrolled_arch_gradients",
]
