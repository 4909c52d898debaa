"""Checkpoints written off the training thread.

The training thread pays only for a host copy of the state (``host_copy``: one
device-to-host copy per tensor, a single wait for all of them); packing, writing, fsync and
rotation run on the ``loco-checkpoint`` thread. A state submitted while an earlier one is
still being written waits as the only pending one: a newer submit replaces it (the disk
cannot keep up, so the newest state is the one worth having), and at most two host copies
exist at a time. Writes stay atomic (``save_checkpoint``): a process killed mid-write
leaves the previous checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpoint import NonFiniteState, save_checkpoint

log = logging.getLogger(__name__)


def host_copy(state: Any) -> Any:
    """``state`` with every tensor copied to host memory the caller no longer touches
    (containers rebuilt, other leaves shared: they are immutable or fresh). Device tensors
    are copied asynchronously and waited for once."""
    devices: set[torch.device] = set()

    def copy(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if t.device.type == "cuda":
                devices.add(t.device)
                return t.to("cpu", non_blocking=True)  # into pinned memory: asynchronous
            return t.clone()
        if isinstance(obj, dict):
            return {k: copy(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(copy(v) for v in obj)
        return obj

    out = copy(state)
    for device in devices:
        torch.cuda.synchronize(device)
    return out


class CheckpointWriter:
    """Writes the states handed to ``submit`` to ``path`` on a background thread.
    ``on_error(tag, exc)`` is called on that thread when a write fails (full disk, NaN in
    the state), with the ``tag`` the state was submitted with: the previous checkpoint
    stays, training goes on."""

    def __init__(self, path: Path, keep: int, on_error: Callable[[Any, BaseException], None]):
        self.path = path
        self.keep = keep
        self.on_error = on_error
        self.written = 0  # checkpoints written
        self.replaced = 0  # states replaced by a newer one before their write started
        self._cond = threading.Condition()
        self._pending: Any = None
        self._writing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="loco-checkpoint", daemon=True)
        self._thread.start()

    def submit(self, state: Any, tag: Any = None) -> None:
        """Queue ``state`` (a host copy: see ``host_copy``) to be written; ``tag`` (e.g. its
        round) is handed back to ``on_error``."""
        with self._cond:
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            if self._pending is not None:
                self.replaced += 1
                log.info("checkpoint of %s: the previous state was still waiting for the disk; writing the newer "
                         "one instead", self.path.name)
            self._pending = (state, tag)
            self._cond.notify_all()

    def flush(self) -> None:
        """Wait until everything submitted is written (or has failed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and not self._writing)

    def close(self) -> None:
        """Write what is pending, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return  # closed, nothing left
                (state, tag), self._pending, self._writing = self._pending, None, True
            try:
                save_checkpoint(self.path, state, keep=self.keep)
                self.written += 1
            except (OSError, NonFiniteState) as exc:
                self.on_error(tag, exc)
            except Exception as exc:  # a bug here must not end the thread silently with writes pending
                log.exception("checkpoint to %s failed", self.path)
                self.on_error(tag, exc)
            finally:
                del state
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()
