"""Engines: the search loop (and, later, the retrain loop). Pure torch, no Ray."""

from maenas_ray.engines.search import (
    CHECKPOINT_FILE,
    CheckpointMismatchError,
    EpochReport,
    SearchCallback,
    SearchResult,
    load_search_state,
    resolve_device,
    run_search,
    unrolled_arch_gradients,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointMismatchError",
    "EpochReport",
    "SearchCallback",
    "SearchResult",
    "load_search_state",
    "resolve_device",
    "run_search",
    "unrolled_arch_gradients",
]
