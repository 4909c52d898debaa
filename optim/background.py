"""Running a communicator call on a background thread (CO2, Streaming DiLoCo's overlap).

The handoff rule that keeps it race-free: the tensors given to ``start`` belong to the
background thread until ``wait`` returns; the caller neither writes them nor reads the
result before that. Only one reduce is in flight at a time (``start`` refuses a second),
so the caller can reuse one send buffer and the communicator can reuse one result buffer.
The Future's lock orders the background thread's writes before the caller's reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .communicator import Communicator, ReduceResult


class PendingReduce:
    """A reduce in flight; ``wait`` returns its result."""

    def __init__(self, round: int):
        self.round = round
        self._future: Future[ReduceResult] | None = None

    def wait(self) -> ReduceResult:
        assert self._future is not None
        return self._future.result()


class BackgroundReducer:
    def __init__(self, comm: Communicator):
        self.comm = comm
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loco-reduce")
        self._pending: PendingReduce | None = None

    @property
    def in_flight(self) -> PendingReduce | None:
        return self._pending

    def start(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> PendingReduce:
        if self._pending is not None:
            raise RuntimeError(f"reduce of round {self._pending.round} still in flight; wait for it first")
        pending = PendingReduce(round)

        pending._future = self._pool.submit(self.comm.all_reduce_mean, tensors, round, span)
        self._pending = pending
        return pending

    def wait(self) -> ReduceResult | None:
        """The in-flight reduce's result (None if there is none); frees the send buffer."""
        pending, self._pending = self._pending, None
        return None if pending is None else pending.wait()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
