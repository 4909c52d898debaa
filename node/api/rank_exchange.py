"""A member of several processes exchanging with the swarm from all of its ranks at once
(``rank_exchange="parallel"``, the default; NoLoCo's only where its outer state is split over
the ranks: FSDP inside).

The leader (rank 0) still runs the round: matchmaking, the commit step, the outer math.
What goes over the network is split: the round's vector is cut into one contiguous region
per rank (:mod:`loco.protocols.regions`), the leader hands each rank its region, every rank
sends and averages its region through its own ZeroMQ endpoint with the ranks of the other
members that hold the same stretch, and the averaged regions come back to the leader. A
member's traffic then leaves through as many endpoints (and network links) as it has
ranks, and the owners' averaging is spread over them. Members match by position in the
whole vector, so members of different rank counts (or of one process) average together.

All of this travels over a *side channel*: a gloo group of the member's processes of its
own, served on every other rank by a thread of its own. The exchange may then run wherever
the leader's algorithm runs it: on the training thread (DiLoCo, DDP) or on a background
thread while training goes on (Streaming DiLoCo's fragments, CO2's reduce a round late),
and the ranks' training thread keeps its own collectives (the step broadcasts, FSDP's)
without the two interleaving. The regions pass through host memory (gloo) also on GPUs.

Every rank's endpoint goes to the other members in the leader's JOIN and in the roster.
Rank r > 0 opens its endpoint with the member's id and signing key (the leader hands them
over inside the member), so peers check its messages like the leader's.

A rank other than the leader does not watch the DHT: while an exchange is in flight the
leader sends it every change of which round members are live (``loco.protocols.rank_view``),
so every rank stops waiting for a member that died mid-exchange when the leader does, at
its record's expiry, not at ``allreduce_timeout_s``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from loco.node.config import CollectiveConfig, CompressionConfig
from loco.protocols.codecs import Layout
from loco.protocols.data_phase import DataPhase, Member, Region
from loco.protocols.flat import flat_of
from loco.protocols.gossip_parts import PartExchange
from loco.protocols.membership import PeerInfo
from loco.protocols.rank_view import RelayedView, ViewRelay
from loco.protocols.regions import split_bounds

from .options import as_compression, compressor_for
from .rank_gossip import GOSSIP, serve_gossip
from .swarm import Swarm, rank_transport

if TYPE_CHECKING:
    from .ranks import Ranks

log = logging.getLogger(__name__)

# what the leader tells the other ranks on the side channel: an attempt's exchange, the
# round's end, the algorithm's end
EXCHANGE, END, STOP = "rank-exchange", "rank-end", "rank-stop"
# a rank's side-channel thread waits for the next exchange through a whole round of
# training (rounds of an hour are normal); a leader that dies closes its sockets, which
# ends the wait at once
SIDE_CHANNEL_WAIT = timedelta(days=7)

RANK_EXCHANGES = ("parallel", "leader")


def splits_exchange(algorithm: type, ranks: Ranks | None, rank_exchange: str,
                    compression: str | CompressionConfig) -> bool:
    """Whether a member's ranks exchange their own regions (else the leader sends it all:
    L-GreCo, whose per-layer plan lives in the leader's codec state)."""
    if rank_exchange not in RANK_EXCHANGES:
        raise ValueError(f"rank_exchange must be one of {', '.join(RANK_EXCHANGES)}, got {rank_exchange!r}")
    return (ranks is not None and ranks.size > 1 and rank_exchange == "parallel"
            and algorithm.exchanges_per_rank and not as_compression(compression).lgreco.enabled)


def uses_lanes(algorithm: type, ranks: Ranks | None, rank_exchange: str, compression: str | CompressionConfig,
               split: bool) -> bool:
    """Whether a member's ranks exchange from their own endpoints (``LeaderLanes`` and
    ``RankLane``): where ``splits_exchange``, and for an algorithm that does so only with
    its outer state split over the ranks (NoLoCo) only then."""
    return splits_exchange(algorithm, ranks, rank_exchange, compression) and \
        (split or not algorithm.rank_exchange_needs_split)


def whole_norm(ranks: Ranks, region: torch.Tensor) -> float:
    """The norm of the member's whole vector, from every rank's region (a collective)."""
    (square,) = ranks.summed([float(torch.linalg.vector_norm(region)) ** 2])
    return math.sqrt(square)


def _wire(roster: list[Member]) -> list[list[Any]]:
    return [[m.id, m.endpoint, m.weight, list(m.ranks)] for m in roster]


class LeaderLanes:
    """The leader's side (``loco.protocols.collective.RankExchange``)."""

    def __init__(self, ranks: Ranks, swarm: Swarm, split_layout: Callable[[int], Layout] | None = None):
        """``split_layout``: when every rank keeps its own region of the outer state
        (split_state.py), the shapes of what sync ``round`` averages as a whole (the model's
        parameters; Streaming DiLoCo: the fragment of that step): each rank then exchanges
        the region of it that it holds, and nothing is scattered from or gathered to this rank."""
        self.split_layout = split_layout
        self.ranks = ranks.side_channel(SIDE_CHANNEL_WAIT)
        self.ranks.share(swarm.rank_endpoint_spec())
        self.swarm = swarm
        self.endpoints: list[str] = self.ranks.all_gather(swarm.endpoint)
        self._out: torch.Tensor | None = None
        self._closed = False

    def exchange(self, data: DataPhase, round: int, attempt: int, tensors, roster: list[Member]):
        flat = flat_of(tensors)
        layout = self.split_layout(round) if self.split_layout is not None else Layout.of(tensors)
        bounds = split_bounds(layout.total, self.ranks.size)
        for m in roster:
            for endpoint in m.ranks:
                self.swarm.transport.name_peer(endpoint, m.id)
        # the member's whole norm, for the outlier rule (every rank sends it with its parts)
        norm = None if self.split_layout is not None else float(torch.linalg.vector_norm(flat))
        self.ranks.share((EXCHANGE, round, attempt, _wire(roster), data.span, data.sessions, layout.shapes,
                          data.chunk_bytes, norm))
        if self.split_layout is not None:  # every rank holds its region already
            region, norm = flat, whole_norm(self.ranks, flat)
        else:
            region = self.ranks.scatter_regions(flat, bounds)
        # (after the scatter: every rank has begun this attempt, so no view reaches one early)
        with ViewRelay(self.swarm.transport, self.endpoints[1:], round, attempt,
                       [m.id for m in roster if m.id != self.swarm.id], self.swarm.peers, data.check_s):
            out, missing = data.exchange(round, attempt, [region], roster, Region(0, layout), norm)
            reports = self.ranks.all_gather((missing, sorted(data.suspects), (0, 0, 0)))
        self.swarm.count_rank_bytes([r[2] for r in reports[1:]])
        suspects = sorted({s for _, ss, _ in reports for s in ss})
        missing = sorted({m for ms, _, _ in reports for m in ms})
        if missing:
            return None, missing, suspects
        if self.split_layout is not None:  # (every rank keeps its region's mean)
            return out, [], suspects
        if self._out is None or self._out.numel() != flat.numel():
            self._out = torch.empty(flat.numel(), dtype=torch.float32)
        self.ranks.gather_regions(out, bounds, self._out)
        return self._out, [], suspects

    def finish(self, round: int, ok: bool) -> None:
        self.ranks.share((END, ok, round))

    def close(self) -> None:
        """The other ranks' side-channel threads end (after any exchange in flight: call it
        once the algorithm's background work is over)."""
        if not self._closed:
            self._closed = True
            self.ranks.share((STOP,))


class RankLane:
    """A follower rank's side: its own endpoint, codec state and data phase, and a thread
    that runs what the leader's ``LeaderLanes`` asks on the side channel until it says stop."""

    def __init__(self, ranks: Ranks, compression: str | CompressionConfig, timeouts: CollectiveConfig | None,
                 seed: int, split: bool = False):
        """``split``: this rank keeps its region of the outer state (split_state.py) and
        offers its region's pseudo-gradient through ``reduce``; else the leader scatters it."""
        self.split = split
        self._offered: tuple[int, torch.Tensor] | None = None  # (sync, region) the training thread offers
        self._last: tuple[int, torch.Tensor | None] | None = None  # the last attempt's (sync, mean)
        self._ended: dict[int, tuple[torch.Tensor | None, int]] = {}  # sync -> (the committed mean or None, group size)
        self._cond = threading.Condition()
        self._stopped = False
        self.ranks = ranks.side_channel(SIDE_CHANNEL_WAIT)
        self.transport = rank_transport(self.ranks.share(), self.ranks.rank)
        self.ranks.all_gather(self.transport.endpoint)
        self.compressor = compressor_for(compression, seed)
        t = timeouts or CollectiveConfig()
        # who is live: the leader's DHT view, relayed while an exchange is in flight
        self.view = RelayedView(self.transport)
        # chunk_bytes: a placeholder; the leader's comes with every EXCHANGE (segments are cut
        # by it, so every rank of every member must use the same)
        self.data = DataPhase(self.transport, self.compressor, self.view.peers, t.allreduce_timeout_s, None,
                              4 << 20, t.max_norm_ratio)
        self.parts = PartExchange(self.transport, self.compressor)  # (NoLoCo's gossip: rank_gossip.py)
        self.error: BaseException | None = None  # what ended the thread, if not the leader's stop
        self._offer_wait_s = t.allreduce_timeout_s
        self._thread = threading.Thread(target=self._serve_until_stopped, name="loco-rank-lane", daemon=True)
        self._thread.start()

    def _serve_until_stopped(self) -> None:
        try:
            while (message := self.ranks.share())[0] != STOP:
                self.serve(message)
        except Exception as e:  # the side channel broke (the leader died): the training thread's next
            self.error = e     # collective fails too, and the rank ends there
            log.warning("rank %d stopped serving the member's exchange: %s", self.ranks.rank, e)
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def reduce(self, sync: int, region: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """On the training thread (a split outer state): offer this rank's region of sync
        ``sync``'s vector (a pseudo-gradient; NoLoCo's [φ | θ − φ]) and wait for the
        leader's end of that sync: (the region's mean, the group's size) where it
        committed, (None, 1) where it did not (the size is 0 where the leader reports it)."""
        with self._cond:
            self._offered = (sync, region)
            self._cond.notify_all()
            self._cond.wait_for(lambda: sync in self._ended or self._stopped)
            self._offered = None
            if sync not in self._ended:
                raise RuntimeError(f"rank {self.ranks.rank} lost the member's exchange channel in sync {sync}: "
                                   f"{self.error or 'the leader stopped it'}")
            return self._ended.pop(sync)

    def offered(self, sync: int) -> torch.Tensor:
        """(On the side channel's thread) the region the training thread offers for ``sync``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._offered is not None and self._offered[0] == sync,
                                       self._offer_wait_s):
                raise RuntimeError(f"rank {self.ranks.rank} never computed its region of sync {sync}")
            return self._offered[1]

    def _end(self, ok: bool, sync: int) -> None:
        last = self._last if self._last is not None and self._last[0] == sync else None
        if ok and (last is None or last[1] is None):  # the member would apply a mean this rank lacks
            raise RuntimeError(f"rank {self.ranks.rank}: the leader committed sync {sync}, whose mean this rank "
                               "does not hold")
        with self._cond:
            self._ended[sync] = (last[1], 0) if ok else (None, 1)
            self._last = None
            self._cond.notify_all()

    def settle(self, sync: int, mean: torch.Tensor | None, group_size: int) -> None:
        """The end of ``sync`` for the training thread waiting in ``reduce``."""
        with self._cond:
            self._ended[sync] = (mean, group_size)
            self._cond.notify_all()

    def serve(self, message: tuple) -> None:
        if message[0] == GOSSIP:
            self.settle(message[1], *serve_gossip(self, self.parts, message))
            return
        if message[0] == END:  # error feedback keeps what was dropped only if the round was applied
            (self.compressor.commit if message[1] else self.compressor.discard)()
            if self.split:
                self._end(message[1], message[2])
            return
        _, round, attempt, members, span, sessions, shapes, chunk_bytes, norm = message
        roster = [Member(i, e, w, tuple(r)) for i, e, w, r in members]
        if attempt == 0:
            self.transport.mailbox.prune(round)
            self.data.begin(span, sessions)
        # no DHT here: the members of the attempt count as live until the leader's view says otherwise
        self.view.begin(round, attempt, [PeerInfo(m.id, m.endpoint, session=sessions.get(m.id, ""))
                                         for m in roster if m.id != self.transport.node_id])
        for m in roster:
            for endpoint in m.ranks or (m.endpoint,):
                self.transport.name_peer(endpoint, m.id)
        self.data.chunk_bytes = chunk_bytes
        layout = Layout(shapes)
        bounds = split_bounds(layout.total, self.ranks.size)
        if self.split:
            region = self.offered(round)
            norm = whole_norm(self.ranks, region)
        else:
            region = self.ranks.scatter_regions(None, bounds)
        out, missing = self.data.exchange(round, attempt, [region], roster, Region(self.ranks.rank, layout), norm)
        t = self.transport
        reports = self.ranks.all_gather((missing, sorted(self.data.suspects),
                                         (t.bytes_sent, t.bytes_queued, t.bytes_recv)))
        if self.split:
            self._last = (round, None if any(ms for ms, _, _ in reports) else out)
            return
        if any(ms for ms, _, _ in reports):
            return
        self.ranks.gather_regions(out, bounds, None)

    def close(self, timeout_s: float = 60.0) -> None:
        """After the leader's ``LeaderLanes.close``: the thread ends, then the endpoint."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # no stop came (the leader did not close): the thread is left waiting
            log.warning("rank %d: the leader never closed the member's exchange", self.ranks.rank)
            return
        self.transport.close()
