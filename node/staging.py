"""GPU tensors in and out of the network through host buffers allocated once.

The collective and the wire work on host memory. Handing them GPU tensors would make a
fresh pageable host copy of the whole model every round (and a fresh GPU copy of the
result). ``HostStaging`` instead keeps, per slot, one pinned host buffer and one device
buffer of the largest size seen, and copies through them on a side CUDA stream, so
copies of a background reduce (CO2, Streaming DiLoCo) overlap the training kernels of
the default stream. Two slots: CO2 holds the result of round t while round t + 1's
reduce runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loco.optim.communicator import ReduceResult
from loco.optim.flat import split_like


class HostStaging:
    def __init__(self, device: torch.device | str, slots: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None] * slots
        self._dev: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self.allocations = 0  # buffers created so far (tests check it stops growing)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _buffer(self, pool: list[torch.Tensor | None], slot: int, numel: int, device: torch.device) -> torch.Tensor:
        buf = pool[slot]
        if buf is None or buf.numel() < numel:
            pinned = device.type == "cpu" and self.cuda
            buf = torch.empty(numel, dtype=torch.float32, device=device, pin_memory=pinned)
            pool[slot] = buf
            self.allocations += 1
        return buf[:numel]

    def to_host(self, tensors: Sequence[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """Copy into the next slot's host buffer; returns (slot, float32 host views)."""
        slot = self._next
        self._next = (self._next + 1) % len(self._host)
        numel = sum(t.numel() for t in tensors)
        host = split_like(self._buffer(self._host, slot, numel, torch.device("cpu")), tensors)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs are ready
            with torch.cuda.stream(self.stream):
                for h, t in zip(host, tensors, strict=True):
                    h.copy_(t.detach(), non_blocking=True)
            self.stream.synchronize()
        else:
            for h, t in zip(host, tensors, strict=True):
                h.copy_(t.detach())
        return slot, host

    def to_device(self, slot: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A result (host tensors) into the slot's device buffer, through its pinned buffer."""
        numel = sum(t.numel() for t in tensors)
        host = split_like(self._buffer(self._host, slot, numel, torch.device("cpu")), tensors)
        for h, t in zip(host, tensors, strict=True):
            if h.data_ptr() != t.data_ptr():
                h.copy_(t)
        if not self.cuda:
            return host
        dev = split_like(self._buffer(self._dev, slot, numel, self.device), tensors)
        with torch.cuda.stream(self.stream):
            for d, h in zip(dev, host, strict=True):
                d.copy_(h, non_blocking=True)
        self.stream.synchronize()
        return dev


class StagedCommunicator:
    """Wraps an optim communicator: GPU inputs go out through ``HostStaging``, results come
    back as views of its device buffers (valid until the slot is reused two calls later)."""

    def __init__(self, inner, device: torch.device | str):
        self.inner = inner
        self.staging = HostStaging(device)

    def __getattr__(self, name: str):  # last, lag, state_hash, ...: the wrapped communicator's
        return getattr(self.inner, name)

    def _staged(self, call, tensors: Sequence[torch.Tensor], round: int, **kw) -> ReduceResult:
        if not any(t.device.type == "cuda" for t in tensors):
            return call(tensors, round, **kw)
        slot, host = self.staging.to_host(tensors)
        result = call(host, round, **kw)
        if result.tensors is not None:
            result.tensors = self.staging.to_device(slot, result.tensors)
        return result

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        return self._staged(self.inner.all_reduce_mean, tensors, round, span=span)

    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        return self._staged(self.inner.group_mean, tensors, round)
