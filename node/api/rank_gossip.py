"""NoLoCo's data exchange in a member whose outer state is split over its ranks
(split_state.py): every rank gossips its own region.

The leader agrees on the round's partners with their leaders (the handshake,
node/gossip_member.py) and tells its ranks on the side channel (rank_exchange.py) whom to
exchange with and until when. Every rank then sends its region of [φ | θ − φ] to the ranks of
each partner that hold it and collects theirs for its region (``protocols.gossip_parts``),
with the leader's view of who is live relayed to it as in the all-reduce. Each rank reports
which partners' regions reached it intact and their sum of squares; the leader decides once
which partners the member averages with (every rank got theirs, and the whole norm,
summed over the ranks, is no outlier) and tells the ranks, which average their regions in
the same sorted-id order the leader does.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch

from loco.node.gossip_member import SECTIONS, MemberData, OneProcessParts
from loco.node.sync import mean_of
from loco.protocols.codecs import Compressor, Layout
from loco.protocols.gossip_parts import PartExchange, PartsResult, sum_of_squares
from loco.protocols.membership import PeerInfo
from loco.protocols.rank_view import ViewRelay
from loco.protocols.regions import split_bounds
from loco.protocols.transport import Transport

if TYPE_CHECKING:
    from .rank_exchange import LeaderLanes, RankLane
    from .region_weights import RegionWeights

GOSSIP = "rank-gossip"  # what the leader tells the other ranks on the side channel


def _report(got: PartsResult, sections: list[torch.Tensor], transport: Transport) -> tuple:
    """What a rank tells the leader: whose regions reached it intact, their sums of squares,
    its own region's, whom it gave up on, and its endpoint's byte counters."""
    return (sorted(got.received), got.squares(), sum_of_squares(sections), got.declined,
            (transport.bytes_sent, transport.bytes_queued, transport.bytes_recv))


class RankParts(OneProcessParts):
    """The leader's side (a ``gossip_member.MemberParts``): its own region from its own
    endpoint, as a member of one process sends the whole, and the other ranks told."""

    def __init__(self, lanes: LeaderLanes, region: RegionWeights, transport: Transport, compressor: Compressor,
                 stop: Any = None):
        super().__init__(transport, compressor, stop)
        self.lanes = lanes
        (self.group,) = region.groups  # (NoLoCo's: one group of every parameter)
        self.endpoints = list(lanes.endpoints)

    def whole_numel(self, section: torch.Tensor) -> int:
        return self.group.bounds[-1]

    def run(self, round, sections, shapes, partners, deadline, live) -> MemberData:
        shapes = self.group.shapes  # (the math holds flat regions: the codecs work on the whole's layers)
        ranks = self.lanes.ranks
        ranks.share((GOSSIP, round, partners, max(0.0, deadline - time.monotonic()), shapes))
        with ViewRelay(self.transport, self.endpoints[1:], round, 0, list(partners), live):
            got = self.parts.exchange(round, sections, self.group.lo, Layout(shapes), partners, deadline,
                                      live=lambda: [p.id for p in live()])
            reports = ranks.all_gather(_report(got, sections, self.transport))
        complete = set(partners)
        for received, _, _, _, _ in reports:
            complete &= set(received)
        norms = {pid: math.sqrt(sum(r[1][pid] for r in reports)) for pid in complete}
        declined = sorted({p for r in reports for p in r[3]})
        silent = sorted(set(partners) - complete - set(declined))
        self.lanes.swarm.count_rank_bytes([r[4] for r in reports[1:]])
        return MemberData({pid: got.received[pid] for pid in complete}, norms,
                          math.sqrt(sum(r[2] for r in reports)), declined, silent)

    def decide(self, round: int, used: list[str]) -> None:
        self.lanes.ranks.share(used)
        super().decide(round, used)


def serve_gossip(lane: RankLane, parts: PartExchange, message: tuple) -> tuple[torch.Tensor | None, int]:
    """A follower rank's side of one round: exchange its region with the partners' ranks,
    report, and average with the partners the leader decided on. Returns (this rank's
    region of the mean, the group's size), or (None, 1) when the member averages with nobody."""
    _, round, partners, left, shapes = message
    deadline = time.monotonic() + left
    layout = Layout(shapes)
    bounds = split_bounds(layout.total, lane.ranks.size)
    region = lane.offered(round)
    sections = list(region.view(SECTIONS, -1))
    lane.view.begin(round, 0, [PeerInfo(pid, eps[0]) for pid, eps in partners.items()])
    got = parts.exchange(round, sections, bounds[lane.ranks.rank], layout, partners, deadline,
                         live=lambda: [p.id for p in lane.view.peers()])
    lane.ranks.all_gather(_report(got, sections, lane.transport))
    used = lane.ranks.share()
    (lane.compressor.commit if used else lane.compressor.discard)()
    if not used:
        return None, 1
    return torch.cat(mean_of(lane.transport.node_id, sections, got.received, used)), len(used) + 1
