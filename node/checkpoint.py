"""Atomic checkpoints: write to a temporary file in the same folder, fsync, rename.

A crash (or a full disk) at any moment leaves either the previous checkpoint or the new
one, never a torn file. A failed write is reported to the caller, which keeps training.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that exists but cannot be used (corrupt, truncated, another format, or
    written by another configuration). The file is left as it is."""


class NonFiniteState(ValueError):
    """The state to save holds NaN or Inf: writing it would replace a good checkpoint with
    one no run can resume from."""


def non_finite_entries(state: Any, where: str = "") -> list[str]:
    """Paths (``model.wte.weight``, ``outer.anchor[3]``) of floating tensors in ``state``
    that hold NaN or Inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return [where or "<tensor>"]
        return []
    if isinstance(state, dict):
        return [p for k, v in state.items() for p in non_finite_entries(v, f"{where}.{k}" if where else str(k))]
    if isinstance(state, (list, tuple)):
        return [p for i, v in enumerate(state) for p in non_finite_entries(v, f"{where}[{i}]")]
    return []


def previous(path: Path, n: int) -> Path:
    """The n-th older checkpoint kept beside ``path`` (``node0.pt.1`` is the one before)."""
    return path.with_name(f"{path.name}.{n}")


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Temp files of ``path`` left by a process killed mid-write (they are never read)."""
    stale = sorted(path.parent.glob(f"{path.name}.*.tmp")) if path.parent.exists() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def save_checkpoint(path: Path, state: dict[str, Any], keep: int = 1) -> None:
    """Raises OSError (disk full, permissions) after removing the partial temp file, and
    NonFiniteState, before writing anything, if a tensor holds NaN or Inf."""
    bad = non_finite_entries(state)
    if bad:
        raise NonFiniteState(f"not writing {path}: {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[0]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        _rotate(path, keep)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rotate(path: Path, keep: int) -> None:
    """Keep ``keep`` previous checkpoints: node0.pt -> node0.pt.1 -> node0.pt.2 ... (hard
    links where the file system has them: no copy, and ``path`` stays in place until the
    new file replaces it)."""
    if keep < 1 or not path.exists():
        return
    for n in range(keep - 1, 0, -1):
        if previous(path, n).exists():
            os.replace(previous(path, n), previous(path, n + 1))
    older = previous(path, 1)
    older.unlink(missing_ok=True)
    try:
        os.link(path, older)
    except OSError:  # no hard links here (some network file systems): a copy
        shutil.copy2(path, older)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved at ``path``; None if there is none. CheckpointError (one line that
    names the file) if it cannot be read: the file is never modified here."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for truncated, empty or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120] if str(exc) else 'empty'}); it was left as it is: "
                              f"move it away, restore {previous(path, 1).name}, or use another --out") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}, expected {FORMAT}; it was left as it is")
    return state
