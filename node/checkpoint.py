"""Atomic, portable checkpoints: one safetensors file per node.

Every tensor of the state is a named tensor of the file (``trainer.model.tok.weight``,
``outer.anchor[3]``: the file opens with the safetensors library alone, in any language),
and everything else (round, step, optimizer settings, RNG positions) is JSON in its
metadata. Loading never unpickles anything, so a checkpoint from an untrusted source cannot
run code. Writes go to a temporary file in the same folder, are fsynced and renamed: a crash
(or a full disk) at any moment leaves the previous checkpoint or the new one, never a torn
file. A failed write is reported to the caller, which keeps training.

Checkpoints of format 1 (pickled ``<node>.pt`` files) are read once, through
``torch.load(weights_only=True)`` (tensors and plain containers only), and the next save
writes the new format beside them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORMAT = 2
SUFFIX = ".safetensors"


def checkpoint_file(folder: Path, node_id: str) -> Path:
    return folder / f"{node_id}{SUFFIX}"


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


def versions(path: Path) -> list[Path]:
    """``path`` and its previous versions that exist, newest first (``path`` itself always)."""
    return [path] + [previous(path, n) for n in range(1, 1000) if previous(path, n).exists()]


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Temp files of ``path`` left by a process killed mid-write (they are never read)."""
    stale = sorted(path.parent.glob(f"{path.name}.*.tmp")) if path.parent.exists() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


class _Packer:
    """The state as a JSON skeleton plus named tensors. Tensors that are views of one
    another (tied weights) are stored once; numpy arrays travel as tensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[tuple, str] = {}

    def _tensor(self, t: torch.Tensor, where: str) -> str:
        t = t.detach()
        same = (t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                t.untyped_storage().data_ptr() if t.numel() else id(t))
        name = self._names.get(same)
        if name is None:
            name, n = where or "tensor", 1
            while name in self.tensors:  # two paths that print alike ({"a": {"b": x}} and {"a.b": y})
                name, n = f"{where}#{n}", n + 1
            self._names[same] = name
            self.tensors[name] = t
        return name

    def pack(self, obj: Any, where: str = "") -> Any:
        if isinstance(obj, torch.Tensor):
            return {"$t": self._tensor(obj, where)}
        if isinstance(obj, np.ndarray):
            return {"$np": self._tensor(torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj),
                                        where), "dtype": obj.dtype.str}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, dict):
            return {"$d": [[k, self.pack(v, f"{where}.{k}" if where else str(k))] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            items = [self.pack(v, f"{where}[{i}]") for i, v in enumerate(obj)]
            return {"$tu": items} if isinstance(obj, tuple) else items
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"checkpoint state at {where or 'the top'} holds a {type(obj).__name__}, which has no "
                        f"portable form (tensors, numbers, strings and containers of them only)")

    def files_tensors(self) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors, none sharing memory with another (safetensors' rule)."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in self.tensors.items():
            t = t.cpu()
            ptr = t.untyped_storage().data_ptr() if t.numel() else 0
            out[name] = t.contiguous().clone() if (ptr and ptr in seen) or not t.is_contiguous() else t
            seen.add(ptr)
        return out


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "$t" in obj:
        return tensors[obj["$t"]]
    if "$np" in obj:
        t = tensors[obj["$np"]]
        return None if t is None else t.numpy().astype(np.dtype(obj["dtype"]))
    if "$tu" in obj:
        return tuple(_unpack(v, tensors) for v in obj["$tu"])
    return {k: _unpack(v, tensors) for k, v in obj["$d"]}


def save_checkpoint(path: Path, state: dict[str, Any], keep: int = 1) -> None:
    """Raises OSError (disk full, permissions) after removing the partial temp file, and
    NonFiniteState, before writing anything, if a tensor holds NaN or Inf."""
    bad = non_finite_entries(state)
    if bad:
        raise NonFiniteState(f"not writing {path}: {len(bad)} tensor(s) hold NaN/Inf, e.g. {bad[0]}")
    packer = _Packer()
    skeleton = json.dumps(packer.pack(state))
    tensors = packer.files_tensors()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": str(FORMAT), "state": skeleton})
        with open(tmp, "rb") as f:
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


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "empty"
    return CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {first})")


def _read(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT):
                raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            state = _unpack(json.loads(meta["state"]), tensors)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors and json raise several types for torn or foreign files
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, not a state")
    return state


class _NoTensors(dict):
    def __missing__(self, name: str) -> None:
        return None


def checkpoint_summary(path: Path) -> dict[str, Any]:
    """The state at ``path`` with every tensor left out (None): its round, step and
    settings, read from the file's header alone (cheap for a multi-GB checkpoint)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != str(FORMAT):
            raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}, expected {FORMAT}")
        state = _unpack(json.loads(meta["state"]), _NoTensors())
    except CheckpointError:
        raise
    except Exception as exc:  # as in _read
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, not a state")
    return state


def _legacy_globals() -> list[Any]:
    """What a format-1 checkpoint legitimately holds besides tensors: numpy's RNG state."""
    reconstruct = getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read_legacy(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data; it was not "
                                  f"loaded (loading it could run code): move it away") from None
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise CheckpointError(f"checkpoint {path} is not a loco checkpoint of format 1")
    log.info("read %s, a checkpoint of format 1 (pickled); the next checkpoint is written as %s", path,
             path.with_suffix(SUFFIX).name)
    return state


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved at ``path``; None if there is none. Where ``path`` (``<id>.safetensors``)
    does not exist but a format-1 ``<id>.pt`` does, that one, read without unpickling
    objects. CheckpointError (one line that names the file) if it cannot be read: the file
    is never modified here."""
    if path.exists():
        return _read(path, map_location)
    legacy = path.with_suffix(".pt")
    if path.suffix == SUFFIX and legacy.exists():
        return _read_legacy(legacy, map_location)
    return None


def load_latest(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any] | None, Path | None]:
    """The newest readable checkpoint of ``path`` and its file: ``path``, else the previous
    ones (``<path>.1``, ...). One that cannot be read is renamed ``<name>.corrupt-<time>``
    (kept for inspection, never written over) with a warning, and the next is tried; with
    none left, (None, None): the node starts from the swarm's state."""
    for candidate in versions(path):
        try:
            state = load_checkpoint(candidate, map_location)
        except CheckpointError as exc:
            bad = candidate if candidate.exists() else candidate.with_suffix(".pt")  # a format-1 file
            aside = bad.with_name(f"{bad.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(bad, aside)
            log.warning("%s; moved to %s, trying the previous checkpoint", exc, aside.name)
            continue
        if state is not None:
            if candidate != path:
                log.warning("resuming from %s, the newest checkpoint that could be read", candidate.name)
            return state, candidate
    return None, None
