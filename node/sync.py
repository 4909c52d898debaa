"""The optimizers' communicators, backed by the real swarm: the collective (all-reduce) and
the gossip exchange (NoLoCo)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from loco.optim.communicator import ReduceResult
from loco.protocols.collective import GroupAllReduce, RoundResult
from loco.protocols.gossip import ExchangeResult, GroupExchange, random_groups
from loco.protocols.membership import PeerInfo


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

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        peer_round = self.peer_round(round) if self.peer_round else None
        result = self.collective.all_reduce(round, tensors, self.weight, self.state_hash(), peer_round, self.lag)
        self.last = result
        if result.status != "ok":
            return ReduceResult(None, 1, (), result)
        return ReduceResult(result.tensors, len(result.group), result.group, result)


class GossipCommunicator:
    """NoLoCo's GroupCommunicator over protocols.gossip: picks this round's group from the
    live roster, exchanges with the partners, and averages in sorted-id order (so every
    member that heard from the same partners gets the same mean, bit for bit)."""

    def __init__(self, exchange: GroupExchange, me: str, live_peers: Callable[[], list[PeerInfo]],
                 group_size: int, timeout_s: float, seed: int, peer_round: Callable[[], int]):
        self.exchange = exchange
        self.me = me
        self.live_peers = live_peers
        self.group_size = group_size
        self.timeout_s = timeout_s
        self.seed = seed
        self.peer_round = peer_round
        self.last: ExchangeResult | None = None

    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        now = self.peer_round()
        # the roster pairs are drawn from: peers announced at this round, or one behind (their
        # record lags until they finish the previous outer step). A peer announced ahead has
        # finished this round's exchange already: it cannot be a partner any more.
        peers = {p.id: p.endpoint for p in self.live_peers() if now - 1 <= p.round <= now and p.id != self.me}
        groups = random_groups([self.me, *peers], round, self.group_size, self.seed)
        mine = next(g for g in groups if self.me in g)
        partners = {pid: peers[pid] for pid in mine if pid != self.me}
        result = self.exchange.exchange(round, partners, tensors, self.timeout_s)
        self.last = result
        if not result.received:
            return ReduceResult(None, 1, (), result)
        inputs = {pid: [t.reshape(-1) for t in ts] for pid, ts in result.received.items()}
        inputs[self.me] = [t.detach().reshape(-1).to(torch.float32) for t in tensors]
        order = sorted(inputs)
        means = []
        for i in range(len(tensors)):
            acc = inputs[order[0]][i].clone()
            for pid in order[1:]:
                acc.add_(inputs[pid][i])
            means.append(acc.div_(len(order)).view(tensors[i].shape))
        return ReduceResult(means, len(order), tuple(p for p in order if p != self.me), result)
