"""Moving GPU tensors to host memory off the training thread.

The training thread queues a device-to-device copy (milliseconds) and records an event; a
background thread then copies to ordinary (pageable) host memory on a side stream, so the
transfer neither holds the training thread up nor queues behind (or ahead of) the training
stream's kernels. Pageable rather than pinned: pinning gigabytes for every copy goes through
the driver, where it can stall the training thread's kernel launches; in the background the
slower copy costs nothing. Used by the state server's snapshots and the checkpoint writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def ready_event(tensors: Iterable[torch.Tensor]) -> Any:
    """On the training thread, right after queueing the copies that made ``tensors``: an
    event of the current stream that marks them done (None if none is on a GPU)."""
    if not any(t.device.type == "cuda" for t in tensors):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class HostMover:
    """Called on a background thread with one tensor at a time: a host copy of a GPU tensor
    (made on a side stream of its device once ``ready`` has passed); a host tensor as is."""

    def __init__(self, ready: Any):
        self.ready = ready
        self._streams: dict[torch.device, Any] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t
        stream = self._streams.get(t.device)
        if stream is None:
            stream = self._streams[t.device] = torch.cuda.Stream(t.device)
            if self.ready is not None:
                stream.wait_event(self.ready)
        with torch.cuda.stream(stream):
            return t.to("cpu")  # waits for this side stream only
