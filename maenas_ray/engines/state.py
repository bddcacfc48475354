"""Checkpoint files of the engines: written atomically, read without unpickling code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


def save_state(state: dict[str, Any], directory: str | Path, filename: str) -> Path:
    """Write ``state`` to ``directory/filename`` atomically (tmp file, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(
    path: str | Path, filename: str, fmt: str, what: str, keys: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load ``path`` (a file, or a directory holding ``filename``) written in format ``fmt``
    and holding every one of ``keys``.

    ``torch.load(weights_only=True)``: tensors and plain containers only, never code.
    A missing file raises FileNotFoundError; a truncated, foreign or incomplete one
    ValueError. Both name the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"no {what} checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # never repeat PyTorch's advice to load it with weights_only=False: that would run
        # whatever code the file carries
        if "not an allowed global" in str(err):
            raise ValueError(
                f"{what} checkpoint {str(path)!r} is refused: it holds objects other than "
                "tensors and plain containers, which are never unpickled (not a checkpoint "
                "this project wrote, or tampered with)"
            ) from None
        raise ValueError(
            f"{what} checkpoint {str(path)!r} is unreadable (not a torch file): cut short or "
            "corrupt"
        ) from None
    except Exception as err:
        reason = str(err).split(".")[0].strip() or type(err).__name__
        raise ValueError(
            f"{what} checkpoint {str(path)!r} is unreadable ({reason}): cut short or corrupt"
        ) from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{str(path)!r} is not a maenas-ray {what} checkpoint")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{what} checkpoint {str(path)!r} is incomplete: no {', '.join(missing)}")
    return state
