"""The optimizers' communicators, backed by the real swarm: the collective (all-reduce) and
the gossip exchange with the data in every message (a pipeline stage's replicas; loco.NoLoCo's
members agree first and send their data in parts: gossip_member.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loco.optim.communicator import ReduceResult
from loco.protocols.collective import GroupAllReduce, RoundResult
from loco.protocols.gossip import ExchangeResult, GroupExchange, random_groups
from loco.protocols.membership import PeerInfo


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """No NaN or Inf anywhere: one reduction per tensor, read with one host synchronization
    per device (a sum overflows only when a value is near float32's limit: such a tensor is
    then looked at element by element)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for ts in by_device.values():
        sums_finite = torch.isfinite(torch.stack([t.detach().sum(dtype=torch.float32) for t in ts])).tolist()
        if not all(ok or bool(torch.isfinite(t).all()) for ok, t in zip(sums_finite, ts, strict=True)):
            return False
    return True


def norm_outliers(norms: dict[str, float], own: float, ratio: float) -> set[str]:
    """Partners whose norm exceeds ``ratio`` times the lower median of everyone's (this
    member's included): a gossip exchange has no leader to judge, so each member judges
    what it received."""
    if ratio <= 0 or not norms:
        return set()
    values = sorted([*norms.values(), own])
    median = values[(len(values) - 1) // 2]
    return {pid for pid, n in norms.items() if n > ratio * median} if median > 0 else set()


def pick_partners(me: str, live: list[PeerInfo], now: int, round: int, group_size: int,
                  seed: int) -> dict[str, str]:
    """This round's partners (id -> endpoint) from the group ``random_groups`` puts ``me``
    in. The roster pairs are drawn from: peers announced at round ``now`` (this member's), or
    one behind (their record lags until they finish the previous outer step). A peer
    announced ahead has finished this round's exchange already: it cannot be a partner any more."""
    peers = {p.id: p.endpoint for p in live if now - 1 <= p.round <= now and p.id != me}
    groups = random_groups([me, *peers], round, group_size, seed)
    mine = next(g for g in groups if me in g)
    return {pid: peers[pid] for pid in mine if pid != me}


def mean_of(me: str, own: Sequence[torch.Tensor], received: dict[str, list[torch.Tensor]],
            used: Sequence[str]) -> list[torch.Tensor]:
    """The mean of ``own`` and ``used`` partners' sections, summed in sorted-id order."""
    inputs = {pid: received[pid] for pid in used}
    inputs[me] = [t.reshape(-1) for t in own]
    order = sorted(inputs)
    means = []
    for i in range(len(own)):
        acc = inputs[order[0]][i].clone()
        for pid in order[1:]:
            acc.add_(inputs[pid][i])
        means.append(acc.div_(len(order)))
    return means


def outliers(mine: Sequence[torch.Tensor], theirs: dict[str, Sequence[torch.Tensor]], ratio: float) -> set[str]:
    """Partners whose vector is non-finite, or whose norm exceeds ``ratio`` times the
    lower median norm of everyone's (this node's included): a gossip exchange has no
    leader to judge, so each member judges what it received."""
    bad = {pid for pid, ts in theirs.items() if not all_finite(ts)}
    if ratio <= 0:
        return bad
    norms = {pid: float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts])))
             for pid, ts in theirs.items() if pid not in bad}
    own = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in mine])))
    return bad | norm_outliers(norms, own, ratio)


class SwarmCommunicator:
    """Adapts protocols' GroupAllReduce to optim's Communicator; keeps the last round's
    outcome so the daemon can resynchronize and report it."""

    def __init__(self, collective: GroupAllReduce, state_hash: Callable[[], str], weight: float = 1.0,
                 peer_round: Callable[[int], int] | None = None, lag: int = 1):
        self.collective = collective
        self.state_hash = state_hash
        self.weight = weight
        self.peer_round = peer_round
        self.lag = lag
        self.last: RoundResult | None = None

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        peer_round = self.peer_round(round) if self.peer_round else None
        result = self.collective.all_reduce(round, tensors, self.weight, self.state_hash(), peer_round, self.lag,
                                            span=span)
        self.last = result
        if result.status != "ok":
            return ReduceResult(None, 1, (), result)
        if not all_finite(result.tensors):  # never reached by the collective's checks; never applied either
            result.status, result.reason = "skipped", "the average is not finite"
            return ReduceResult(None, 1, (), result)
        return ReduceResult(result.tensors, len(result.group), result.group, result)


class GossipCommunicator:
    """NoLoCo's GroupCommunicator over protocols.gossip: picks this round's group from the
    live roster, exchanges with the partners, and averages in sorted-id order (so every
    member that heard from the same partners gets the same mean, bit for bit)."""

    def __init__(self, exchange: GroupExchange, me: str, live_peers: Callable[[], list[PeerInfo]],
                 group_size: int, timeout_s: float, seed: int, peer_round: Callable[[], int],
                 max_norm_ratio: float = 10.0):
        self.exchange = exchange
        self.me = me
        self.live_peers = live_peers
        self.group_size = group_size
        self.timeout_s = timeout_s
        self.seed = seed
        self.peer_round = peer_round
        self.max_norm_ratio = max_norm_ratio
        self.last: ExchangeResult | None = None
        self.suspects: list[str] = []

    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        partners = pick_partners(self.me, self.live_peers(), self.peer_round(), round, self.group_size, self.seed)
        result = self.exchange.exchange(round, partners, tensors, self.timeout_s)
        self.last = result
        if not result.received:
            return ReduceResult(None, 1, (), result)
        inputs = {pid: [t.reshape(-1) for t in ts] for pid, ts in result.received.items()}
        self.suspects = sorted(outliers(tensors, inputs, self.max_norm_ratio))
        for pid in self.suspects:  # left out of the mean, like a partner that never answered
            del inputs[pid]
        if not inputs:
            return ReduceResult(None, 1, (), result)
        used = sorted(inputs)
        means = mean_of(self.me, [t.detach().to(torch.float32) for t in tensors], inputs, used)
        return ReduceResult([m.view(t.shape) for m, t in zip(means, tensors, strict=True)], len(used) + 1,
                            tuple(used), result)
