"""In-process fake communicators, for unit tests of the math only."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from optim.communicator import ReduceResult


class SoloComm:
    """A group of one: the mean is the input."""

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        return ReduceResult([t.clone().float() for t in tensors], 1)


class ThreadGroup:
    """N replicas, one thread each, averaging through a barrier."""

    def __init__(self, n: int):
        self.n = n
        self._barrier = threading.Barrier(n)
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def member(self, rank: int) -> _Member:
        return _Member(self, rank)


class _Member:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group = group
        self.rank = rank

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        g = self.group
        with g._lock:
            g._inputs[self.rank] = [t.clone().float() for t in tensors]
        g._barrier.wait()
        stacked = [torch.stack([g._inputs[r][i] for r in range(g.n)]) for i in range(len(tensors))]
        out = [s.mean(0) for s in stacked]
        g._barrier.wait()  # nobody overwrites inputs before everyone has read them
        return ReduceResult(out, g.n)


class FailingComm:
    """A round that never completes."""

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        return ReduceResult(None, 1)
