"""NoLoCo's communicator over the swarm: a handshake between members' leaders, then the data
rank to rank.

Every round a member's leader draws its group from the round and the live roster
(``protocols.gossip.random_groups``) and agrees with its partners to average together: a
``GroupExchange`` of no tensors (adoption, declines and the deadline work as in any gossip
exchange), whose messages name the endpoints of the sender's ranks. The data then goes in
parts (``protocols.gossip_parts``): each rank of the member sends its own region of
[φ | θ − φ] to the ranks of each partner that hold it and collects theirs, so a member of
several ranks whose outer state is split over them (node/api/rank_gossip.py) sends from all
of its endpoints at once and no rank holds the whole vector; a member of one process
(``OneProcessParts``) is the case of a single region.

The member averages with the partners whose whole vector arrived intact and whose norm is
no outlier (``norm_outliers``: the group's lower median, as for the all-reduce), decided
once for all its ranks; the mean is taken in sorted-id order, so the members of a group that
heard from each other hold the same mean, bit for bit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from loco.optim.communicator import ReduceResult
from loco.protocols.codecs import Compressor, Layout
from loco.protocols.flat import flat_of, unflatten
from loco.protocols.gossip import GroupExchange
from loco.protocols.gossip_parts import PartExchange, sum_of_squares
from loco.protocols.membership import PeerInfo
from loco.protocols.transport import Transport

from .sync import GossipCommunicator, mean_of, norm_outliers, pick_partners

SECTIONS = 2  # NoLoCo's vector: the slow weights φ, then θ − φ


@dataclass
class MemberData:
    """What a member's ranks collected in a round, as its leader sees it: each partner's
    values over the leader's own region (one tensor per section), the whole norm of each
    partner's vector and of the member's own, and the partners given up on."""

    received: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    own_norm: float = 0.0
    declined: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)


class MemberParts(Protocol):
    """How a member's ranks exchange their data (one process: ``OneProcessParts``)."""

    endpoints: list[str]  # every rank's, in rank order (the leader's first)

    def whole_numel(self, section: torch.Tensor) -> int:
        """A section's whole length (``section``: the leader's region of it)."""
        ...

    def run(self, round: int, sections: list[torch.Tensor], shapes: list[tuple[int, ...]],
            partners: dict[str, list[str]], deadline: float, live: Callable[[], list[PeerInfo]]) -> MemberData:
        """Every rank's part of the round with ``partners`` (none: the ranks are told there is
        nothing to exchange). ``shapes``: the tensors of a section, as the math holds them."""
        ...

    def decide(self, round: int, used: list[str]) -> None: ...

    def skip_to(self, round: int) -> None: ...


class OneProcessParts:
    """A member of one process (or whose leader alone holds the outer state): one region,
    the whole vector, sent from the leader's endpoint."""

    def __init__(self, transport: Transport, compressor: Compressor, stop=None):
        self.parts = PartExchange(transport, compressor, stop)
        self.compressor = compressor
        self.transport = transport
        self.endpoints = [transport.endpoint]

    def whole_numel(self, section: torch.Tensor) -> int:
        return section.numel()

    def run(self, round, sections, shapes, partners, deadline, live) -> MemberData:
        layout = Layout(shapes)
        got = self.parts.exchange(round, sections, 0, layout, partners, deadline,
                                  live=lambda: [p.id for p in live()])
        return MemberData(got.received, {pid: math.sqrt(s) for pid, s in got.squares().items()},
                          math.sqrt(sum_of_squares(sections)), got.declined, got.silent)

    def decide(self, round: int, used: list[str]) -> None:
        (self.compressor.commit if used else self.compressor.discard)()

    def skip_to(self, round: int) -> None:
        self.parts.skip_to(round)


class PartedGossipCommunicator(GossipCommunicator):
    """NoLoCo's GroupCommunicator: the leaders' handshake (``exchange``: a ``GroupExchange``
    that carries no data), then ``member``'s data exchange. ``last``: the round's handshake,
    with the partners the data exchange gave up on added to its declined and silent;
    ``suspects``: partners left out as outliers."""

    def __init__(self, handshake: GroupExchange, member: MemberParts, *args: Any, **kwargs: Any):
        super().__init__(handshake, *args, **kwargs)
        self.member = member

    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        if len(tensors) % SECTIONS:
            raise ValueError(f"a gossip vector is {SECTIONS} sections of the same tensors, got {len(tensors)} tensors")
        half = len(tensors) // SECTIONS
        sections = [flat_of(tensors[j * half:(j + 1) * half]) for j in range(SECTIONS)]
        start = time.monotonic()
        deadline = start + self.timeout_s
        partners = pick_partners(self.me, self.live_peers(), self.peer_round(), round, self.group_size, self.seed)
        eps = self.member.endpoints
        shook = self.exchange.exchange(round, partners, [],
                                        self.timeout_s, extra={"ranks": eps} if len(eps) > 1 else None,
                                        numel=SECTIONS * self.member.whole_numel(sections[0]))
        self.last = shook
        agreed = {pid: list(shook.metas[pid].get("ranks") or [shook.metas[pid]["endpoint"]])
                  for pid in shook.received}
        self.suspects = []
        data = self.member.run(round, sections, [tuple(t.shape) for t in tensors[:half]], agreed, deadline,
                               self.live_peers)
        shook.declined += data.declined
        shook.silent += data.silent
        self.suspects = sorted(norm_outliers(data.norms, data.own_norm, self.max_norm_ratio))
        used = sorted(set(data.received) - set(self.suspects))
        self.member.decide(round, used)
        shook.wait_s = time.monotonic() - start
        if not used:
            return ReduceResult(None, 1, (), shook)
        means = mean_of(self.me, sections, data.received, used)
        shaped = [t for j, m in enumerate(means) for t in unflatten(m, tensors[j * half:(j + 1) * half])]
        return ReduceResult(shaped, len(used) + 1, tuple(used), shook)

    def skip_to(self, round: int) -> None:
        """This member adopted a peer's state: nothing before ``round`` is exchanged."""
        self.exchange.skip_to(round)
        self.member.skip_to(round)
