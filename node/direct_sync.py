"""Averaging within a group the caller fixes (a pipeline stage's replicas in an iteration's
plan), each member sending its contribution straight to every other one: one one-way
latency, where the group all-reduce spends six (join, roster, parts, averages, done,
decision), because the plan already says who averages with whom.

There is no leader to make the members agree, so agreement comes from determinism: every
member averages what it heard (itself included, as the others decode it) in sorted-id
order with the same weights and the same outlier rule, so members that heard from the same
set get the same values, bit for bit. One that missed a message (its partner timed out on
it, or the message came late) steps apart from the others. Each message carries the hash of
its sender's weights, so the next exchange shows it: a member whose weights differ from
those of the smallest id it heard from is ``behind`` and should be given that state again
(the pipeline node rejoins its stage and is handed a replica's state); the others leave it
out of their mean meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from loco.optim.communicator import ReduceResult
from loco.protocols.gossip import ExchangeResult, GroupExchange
from loco.protocols.membership import PeerInfo

from .sync import all_finite

log = logging.getLogger(__name__)


def lower_median_outliers(norms: dict[str, float], ratio: float) -> set[str]:
    """Members whose norm exceeds ``ratio`` times the lower median of all of them (none
    when ``ratio`` is 0 or the median is 0). The same on every member that has the same
    norms: a member judges itself too, so an outlier leaves itself out, as the others do."""
    if ratio <= 0 or len(norms) < 2:
        return set()
    values = sorted(norms.values())
    median = values[(len(values) - 1) // 2]
    return {m for m, n in norms.items() if n > ratio * median} if median > 0 else set()


class DirectCommunicator:
    """optim's Communicator over ``GroupExchange`` for a group given by ``group()`` (the
    other members, as PeerInfo). ``weight``: this member's weight in the next mean (a
    pipeline replica's microbatch count; 0: it offers nothing, and is not judged)."""

    def __init__(self, exchange: GroupExchange, me: str, group: Callable[[], list[PeerInfo]],
                 state_hash: Callable[[], str], timeout_s: float, max_norm_ratio: float = 10.0):
        self.exchange = exchange
        self.me = me
        self.group = group
        self.state_hash = state_hash
        self.timeout_s = timeout_s
        self.max_norm_ratio = max_norm_ratio
        self.weight = 1.0
        self.last: ExchangeResult | None = None
        self.apart: list[str] = []  # members heard from whose weights differ from this one's
        self.behind = False  # this member's weights differ from those of the smallest id it heard from
        self.suspects: list[str] = []  # left out as outliers or non-finite (this member included)

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        partners = {p.id: p.endpoint for p in self.group() if p.id != self.me}
        mine = self.state_hash()
        result = self.exchange.exchange(round, partners, tensors, self.timeout_s,
                                        extra={"weight": float(self.weight), "state": mine})
        self.last = result
        states = {pid: meta.get("state") for pid, meta in result.metas.items()}
        self.apart = sorted(pid for pid, state in states.items() if state != mine)
        first = min([self.me, *states])
        self.behind = first != self.me and states[first] != mine
        heard = {pid: ts for pid, ts in result.received.items() if pid not in self.apart}
        weights = {pid: float(result.metas[pid].get("weight", 1.0)) for pid in heard}
        heard[self.me], weights[self.me] = list(result.own), float(self.weight)
        self.suspects = [] if all_finite(result.own) else [self.me]
        judged = {pid: float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts])))
                  for pid, ts in heard.items() if weights[pid] > 0 and pid not in self.suspects}
        self.suspects = sorted({*self.suspects, *lower_median_outliers(judged, self.max_norm_ratio)})
        if self.suspects:  # every norm, so that a member left out can be told honest from poisoned
            log.warning("round %d: left out of the mean: %s; norms %s, weights %s", round, ", ".join(self.suspects),
                        {pid: f"{n:.4g}" for pid, n in sorted(judged.items())},
                        {pid: weights[pid] for pid in sorted(heard)})
        order = sorted(pid for pid in heard if pid not in self.suspects)
        if not order:
            return ReduceResult(None, 1, (), result)
        total = sum(weights[pid] for pid in order)
        means = []
        for i, t in enumerate(tensors):
            acc = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
            if total > 0:  # (all at weight 0: nobody ran; zeros, which the caller does not step)
                for pid in order:
                    acc.add_(heard[pid][i].reshape(t.shape), alpha=weights[pid])
                acc.div_(total)
            means.append(acc)
        return ReduceResult(means, len(order), tuple(pid for pid in order if pid != self.me), result)
