"""Atomic checkpoints: write to a temporary file in the same folder, fsync, rename.

A crash (or a full disk) at any moment leaves either the previous checkpoint or the new
one, never a torn file. A failed write is reported to the caller, which keeps training.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Raises OSError (disk full, permissions) after removing the partial temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location=map_location, weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}")
    return state
