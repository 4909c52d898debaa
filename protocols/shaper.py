"""Network emulation inside the transport: bandwidth, latency, jitter, loss, link cuts.

Applied on the sending side to the real bytes of every message, so a swarm on one machine
behaves like one spread over a WAN:

    start    = max(now, link busy until, uplink busy until)
    finish   = start + bytes·8 / bandwidth         (serialization; per link and shared uplink)
    deliver  = finish + latency ± jitter           (never before an earlier message on the link:
                                                   a TCP stream does not reorder)
    loss     : the message is dropped with probability ``loss`` (message-level loss: above
               TCP a lost packet shows up as a late or missing message, which the
               collectives' deadlines and retries must absorb)
    cut      : while a link is cut every message on it is dropped

The transport sends the message when ``deliver`` comes, from its delay thread. The shaper
itself is pure bookkeeping (no threads, no sockets), so it is unit-testable with a clock.
Latency is one-way: configure both ends of a link to get a symmetric round trip.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinkProfile:
    bandwidth_bps: float | None = None  # None: unlimited
    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth_bps}")
        if self.latency_s < 0 or self.jitter_s < 0:
            raise ValueError("latency and jitter must be >= 0")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")


@dataclass(frozen=True)
class Cut:
    """The link to ``peer`` is down from ``start`` to ``end`` (unix time)."""

    peer: str
    start: float
    end: float


@dataclass
class _LinkState:
    busy_until: float = 0.0
    last_delivery: float = 0.0


@dataclass
class Shaper:
    default: LinkProfile = field(default_factory=LinkProfile)
    per_peer: dict[str, LinkProfile] = field(default_factory=dict)
    uplink_bps: float | None = None
    cuts: list[Cut] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._links: dict[str, _LinkState] = {}
        self._uplink_busy = 0.0
        self._lock = threading.Lock()
        self.dropped = 0

    def profile(self, peer: str) -> LinkProfile:
        return self.per_peer.get(peer, self.default)

    def is_cut(self, peer: str, wall: float | None = None) -> bool:
        wall = time.time() if wall is None else wall
        return any(c.peer == peer and c.start <= wall < c.end for c in self.cuts)

    def schedule(self, peer: str, nbytes: int, now: float | None = None, wall: float | None = None) -> float | None:
        """When (time.monotonic() scale) a message of ``nbytes`` to ``peer`` should be handed
        to the socket, or None if it is lost."""
        now = time.monotonic() if now is None else now
        prof = self.profile(peer)
        with self._lock:
            if self.is_cut(peer, wall) or (prof.loss and self._rng.random() < prof.loss):
                self.dropped += 1
                return None
            link = self._links.setdefault(peer, _LinkState())
            start = max(now, link.busy_until, self._uplink_busy)
            tx_link = nbytes * 8 / prof.bandwidth_bps if prof.bandwidth_bps else 0.0
            tx_up = nbytes * 8 / self.uplink_bps if self.uplink_bps else 0.0
            link.busy_until = start + max(tx_link, tx_up)
            self._uplink_busy = start + tx_up if tx_up else self._uplink_busy
            jitter = self._rng.uniform(-prof.jitter_s, prof.jitter_s) if prof.jitter_s else 0.0
            deliver = max(link.busy_until + max(0.0, prof.latency_s + jitter), link.last_delivery)
            link.last_delivery = deliver
            return deliver

    @property
    def active(self) -> bool:
        p = self.default
        return bool(self.per_peer or self.uplink_bps or self.cuts or p.bandwidth_bps or p.latency_s
                    or p.jitter_s or p.loss)
