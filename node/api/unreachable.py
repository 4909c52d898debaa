"""Peers whose state could not be fetched, kept out of catch-up until they are reachable again."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loco.protocols.membership import PeerInfo
from loco.protocols.state_sync import probe_answered, send_probe
from loco.protocols.transport import Transport


@dataclass
class _Probing:
    sent: float  # when the last probe left
    requests: list[int] = field(default_factory=list)  # the probes not yet known answered


class UnreachableSources:
    """Across a partition the DHT still shows the other side, whose state cannot be
    fetched: such a source is left out of the catch-up candidates (this node trains with its
    own side meanwhile, never waiting on the other) and probed in the background every
    ``every_s``. It is back as soon as it answers any of its last ``keep`` probes (an
    answer is a round trip: hearing from it is not enough, a link may work one way only), so
    a healed partition merges within a round or two of short rounds."""

    def __init__(self, transport: Transport, every_s: float = 1.0, keep: int = 8):
        self.transport = transport
        self.every_s = every_s
        self.keep = keep  # outstanding probes per source: a late answer to an older one counts
        self._probing: dict[str, _Probing] = {}

    def mark(self, peer: PeerInfo, round: int) -> None:
        now = time.monotonic()
        self._probing[peer.endpoint] = _Probing(now, [send_probe(self.transport, peer.endpoint, round)])

    def reachable(self, peers: list[PeerInfo], round: int) -> list[PeerInfo]:
        """``peers`` less the sources still unreachable; probes those that are due."""
        now = time.monotonic()
        live = {p.endpoint for p in peers}
        for endpoint, probing in list(self._probing.items()):
            if endpoint not in live or any(probe_answered(self.transport, r) for r in probing.requests):
                del self._probing[endpoint]
            elif now - probing.sent > self.every_s:
                probing.requests = [*probing.requests[-(self.keep - 1):], send_probe(self.transport, endpoint, round)]
                probing.sent = now
        return [p for p in peers if p.endpoint not in self._probing]
