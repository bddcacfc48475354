"""What both engines (the search and the retraining) share: the ranks of data-parallel
training, the device and the autocast precision, freezing parameters for a pass, the
report the callbacks get after each epoch, and the check that a checkpoint was written
with the same config. Pure torch, no Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from maenas_ray.config import flatten, resolve_defaults
from maenas_ray.space import Genotype

Engine = Literal["search", "retrain"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (``(0, 1)`` without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_over_ranks(tensors: Sequence[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over the ranks (one all-reduce in total)."""
    if rank_and_world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("search.device = 'cuda' but CUDA is not available on this machine")
    return torch.device(requested)


def autocast_for(device: torch.device, precision: str) -> Callable[[], AbstractContextManager]:
    """bf16 autocast on CUDA (``auto``/``bf16``) or when asked for on CPU; fp32 otherwise.

    In the search it applies to the weight step, the first-order α gradient and the
    evaluation; the second-order α gradient and the Hessian eigenvalue run in full fp32
    (:func:`~maenas_ray.engines.hessian.exact_fp32`)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def frozen(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Parameters do not require gradients inside: a forward pass records no graph for
    their gradients, so a backward pass for other inputs (α) does none of that work."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


@dataclass
class EpochReport:
    """What callbacks get after each epoch (of a search or of a retraining)."""

    epoch: int  # epochs completed (1-based)
    epochs: int
    metrics: dict[str, Any]
    genotype: Genotype
    _state: Callable[[], dict[str, Any]]
    _save: Callable[[dict[str, Any], str | Path], Path]
    _images: Callable[[], torch.Tensor] | None = None

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write the whole run state to ``directory`` (``search_state.pt`` or
        ``retrain_state.pt``), atomically; returns the file."""
        return self._save(self._state(), directory)

    def reconstructions(self) -> torch.Tensor | None:
        """A search's reconstruction grid after this epoch, as an image (3, H, W) in
        [0, 1]: original / masked / reconstruction rows of the 8 held-out images of
        ``reconstruction.png``; None for a retraining."""
        return self._images() if self._images is not None else None


class SearchCallback:
    """Override ``on_epoch_end``; the default does nothing. (Both engines call it.)"""

    def on_epoch_end(self, report: EpochReport) -> None:
        return None


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by a run with another config."""


#: The config sections that decide what each engine computes; the others (tune, space,
#: objective, storage_path, name, the other engine's section) describe the sweep around it.
ENGINE_SECTIONS: dict[Engine, tuple[str, ...]] = {
    "search": ("data", "search"),
    "retrain": ("data", "retrain"),
}

#: Per engine, the keys of its sections that may change between a checkpoint and its
#: resumption (where and how a run runs, not what it computes).
RESUMABLE_CHANGES: dict[Engine, frozenset[str]] = {
    "search": frozenset(
        {
            "data.root", "data.download", "data.num_workers", "search.device",
            "search.nan_retries", "search.nan_lr_factor",  # how to react to a divergence
        }
    ),
    "retrain": frozenset(
        {
            "data.root", "data.download", "data.num_workers", "retrain.device",
            "retrain.num_workers", "retrain.use_gpu", "retrain.cpus_per_worker",
        }
    ),
}  # fmt: skip


def config_changes(
    saved: dict[str, Any], current: dict[str, Any], engine: Engine = "search"
) -> list[str]:
    """The keys of ``engine``'s :data:`ENGINE_SECTIONS` whose values differ between two
    config dicts, as ``"key: old -> new"``, except its :data:`RESUMABLE_CHANGES`."""
    sections, resumable = ENGINE_SECTIONS[engine], RESUMABLE_CHANGES[engine]
    # a config saved before the evaluation masks were resolved at load holds nulls there
    trees = (resolve_defaults(saved), resolve_defaults(current))
    a, b = (flatten({k: v for k, v in tree.items() if k in sections}) for tree in trees)
    return sorted(
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in set(a) | set(b)
        if a.get(k) != b.get(k) and k not in resumable
    )
