"""Checkpoints written off the training thread.

The training thread pays only for a copy of the state that training will not modify
(``private_copy``: on a GPU, a device-to-device copy); moving it to host memory, packing,
writing, fsync and rotation run on the ``loco-checkpoint`` thread. A state submitted while an
earlier one is still being written waits as the only pending one: a newer submit replaces
it (the disk cannot keep up, so the newest state is the one worth having), and at most two
copies exist at a time (on a GPU: up to two copies of the trainer's state in GPU memory
until they reach the host). Writes stay atomic (``save_checkpoint``): a process killed mid-write
leaves the previous checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loco.protocols.host_copy import HostMover, ready_event

from .checkpoint import NonFiniteState, save_checkpoint

log = logging.getLogger(__name__)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it (containers rebuilt, other leaves
    shared: they are immutable or fresh)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj


def private_copy(state: Any) -> Any:
    """On the training thread: ``state`` with every tensor copied where training no longer
    touches it. A GPU tensor is copied on its device: a device-to-device copy costs
    milliseconds where a copy to host memory would hold training up for the whole
    transfer; the writer thread moves it to host memory later, beside the training stream."""
    return _map_tensors(state, lambda t: t.detach().clone())


def _tensors(state: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map_tensors(state, found.append)
    return found


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
        """Queue ``state`` to be written: tensors nothing else modifies (``private_copy``),
        on the host or on a GPU; ``tag`` (e.g. its round) is handed back to ``on_error``."""
        ready = ready_event(_tensors(state))  # the copies queued so far on this thread's stream made them
        with self._cond:
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            if self._pending is not None:
                self.replaced += 1
                log.info("checkpoint of %s: the previous state was still waiting for the disk; writing the newer "
                         "one instead", self.path.name)
            self._pending = (state, tag, ready)
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
                (state, tag, ready), self._pending, self._writing = self._pending, None, True
            try:
                if ready is not None:  # to host memory on a side stream (loco.protocols.host_copy)
                    state = _map_tensors(state, HostMover(ready))
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


class Cadence:
    """When a periodic checkpoint is due: every ``every`` rounds, or (every = 0) at the end of
    the first round at least ``interval_s`` after the previous checkpoint or the start.
    By time by default: a large model's state (gigabytes) written every round would keep the
    disk and the writer thread busy for nothing, while a restarted node catches up from its
    peers anyway; the final checkpoint is written on every clean stop."""

    def __init__(self, every: int, interval_s: float):
        self.every, self.interval_s = every, interval_s
        self._last = time.monotonic()

    def due(self, round: int) -> bool:
        if self.every:
            return round % self.every == 0
        if time.monotonic() - self._last < self.interval_s:
            return False
        self._last = time.monotonic()
        return True
