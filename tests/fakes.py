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


class GroupedThreads:
    """NoLoCo's gossip in one process: replicas (one thread each) average within the group
    ``groups(round)`` assigns them; ``absent`` ranks never answer (their partners time out)."""

    def __init__(self, n: int, groups, absent: frozenset[int] = frozenset(), timeout_s: float = 5.0):
        self.n = n
        self.groups = groups
        self.absent = absent
        self.timeout_s = timeout_s
        self._inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._cond = threading.Condition()

    def member(self, rank: int) -> _GroupMember:
        return _GroupMember(self, rank)


class _GroupMember:
    def __init__(self, group: GroupedThreads, rank: int):
        self.group = group
        self.rank = rank

    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        g = self.group
        mine = next(grp for grp in g.groups(round) if self.rank in grp)
        with g._cond:
            g._inputs[(round, self.rank)] = [t.clone().float() for t in tensors]
            g._cond.notify_all()
            present = [r for r in mine if r not in g.absent]
            g._cond.wait_for(lambda: all((round, r) in g._inputs for r in present), timeout=g.timeout_s)
            got = sorted(r for r in present if (round, r) in g._inputs)
            inputs = [g._inputs[(round, r)] for r in got]
        mean = [torch.stack([x[i] for x in inputs]).mean(0) for i in range(len(tensors))]
        return ReduceResult(mean, len(got), tuple(str(r) for r in got if r != self.rank))


class DelayedComm:
    """Wraps a communicator; every call sleeps a random time first (races show up)."""

    def __init__(self, inner, seed: int, max_delay_s: float = 0.02):
        import random

        self.inner = inner
        self.rng = random.Random(seed)
        self.max_delay_s = max_delay_s

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        import time

        time.sleep(self.rng.uniform(0, self.max_delay_s))
        return self.inner.all_reduce_mean(tensors, round)
