"""In-process fake communicators, for unit tests of the math only."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from loco.optim.communicator import ReduceResult


class SoloComm:
    """A group of one: the mean is the input."""

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        return ReduceResult([t.clone().float() for t in tensors], 1)


class ThreadGroup:
    """N replicas, one thread each, averaging by round id (as a real collective matches
    members: by round, never by call order). A round that does not fill within
    ``timeout_s`` raises instead of hanging the test."""

    def __init__(self, n: int, timeout_s: float = 60.0):
        self.n = n
        self.timeout_s = timeout_s
        self._inputs: dict[int, dict[int, list[torch.Tensor]]] = {}
        self._results: dict[int, list[torch.Tensor]] = {}
        self._readers: dict[int, int] = {}
        self._done: set[int] = set()
        self._cond = threading.Condition()

    def member(self, rank: int) -> _Member:
        return _Member(self, rank)

    def wait_done(self, round: int) -> None:
        """Until every member has the result of ``round``: a replica closed before its last
        reduce ran would leave the others waiting for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: round in self._done, timeout=self.timeout_s):
                raise TimeoutError(f"round {round} is not done")


class _Member:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group = group
        self.rank = rank

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        g = self.group
        with g._cond:
            g._inputs.setdefault(round, {})[self.rank] = [t.clone().float() for t in tensors]
            if len(g._inputs[round]) == g.n:
                inputs = g._inputs[round]
                g._results[round] = [torch.stack([inputs[r][i] for r in range(g.n)]).mean(0)
                                     for i in range(len(tensors))]
                g._cond.notify_all()
            elif not g._cond.wait_for(lambda: round in g._results, timeout=g.timeout_s):
                raise TimeoutError(f"round {round}: {len(g._inputs[round])} of {g.n} replicas arrived")
            out = g._results[round]
            g._readers[round] = g._readers.get(round, 0) + 1
            if g._readers[round] == g.n:  # everyone has it: forget the round
                del g._inputs[round], g._results[round], g._readers[round]
                g._done.add(round)
                g._cond.notify_all()
        return ReduceResult([t.clone() for t in out], g.n)


class FailingComm:
    """A round that never completes."""

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        return ReduceResult(None, 1)


class ScriptedComm:
    """A group of one whose rounds in ``fail`` never complete; records the span each call claims."""

    def __init__(self, fail: set[int]):
        self.fail = fail
        self.spans: dict[int, int] = {}

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        self.spans[round] = span
        if round in self.fail:
            return ReduceResult(None, 1)
        return ReduceResult([t.clone().float() for t in tensors], 1)


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

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        import time

        time.sleep(self.rng.uniform(0, self.max_delay_s))
        return self.inner.all_reduce_mean(tensors, round)
