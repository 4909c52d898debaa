"""The leader of a member of several processes lends its view of the swarm to its other
ranks while they exchange.

Only the leader (rank 0) watches the DHT. A member that dies mid-exchange is given up by the
leader at its record's expiry, but the other ranks, each waiting for its own region's parts
from the dead member, had no view of their own and waited until ``allreduce_timeout_s`` (the
whole member, since the leader gathers their results). Now, while an exchange is in flight,
the leader's ``ViewRelay`` looks at the DHT every ``check_s`` and sends each change of which
round members are live (and in which session) to its ranks' endpoints as a ``RANK_VIEW``;
each rank's ``RelayedView`` answers its data phase's ``live_peers`` with the latest one, so
every rank gives a dead member up as the leader does (two looks in a row, ``AbsenceWatch``).

A ``RANK_VIEW`` counts only when the member itself signed it (its id and its signing key,
which only its own processes hold), and only for the exchange attempt it names.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from .membership import PeerInfo
from .messages import RANK_VIEW
from .transport import ABSENCE_CHECK_S, Transport
from .wire import Message

log = logging.getLogger(__name__)

# the view is (id, session) pairs of the round's members that the DHT shows live
View = list[tuple[str, str]]


class ViewRelay:
    """The leader's side, for one exchange attempt: a thread that sends every change of the
    round members' liveness (``live()``, the leader's DHT view) to ``endpoints`` (its other
    ranks) until ``close``. Use it as a context manager around the attempt."""

    def __init__(self, transport: Transport, endpoints: Sequence[str], round: int, attempt: int,
                 members: Sequence[str], live: Callable[[], list[PeerInfo]], check_s: float = ABSENCE_CHECK_S):
        self.transport = transport
        self.endpoints = list(endpoints)
        self.round, self.attempt = round, attempt
        self.members = set(members)
        self.live = live
        self.check_s = check_s
        self.sent = 0  # views sent (to every endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._relay, name="loco-view-relay", daemon=True)

    def __enter__(self) -> ViewRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _relay(self) -> None:
        last: View | None = None
        while not self._stop.wait(self.check_s):
            try:
                view = sorted((p.id, p.session) for p in self.live() if p.id in self.members)
            except Exception as e:  # a failed lookup says nothing about who left: the ranks keep the last view
                log.debug("view relay: lookup failed: %s", e)
                continue
            if view == last:
                continue
            last = view
            self.sent += 1
            for endpoint in self.endpoints:
                self.transport.send(endpoint, Message(RANK_VIEW, round=self.round, attempt=self.attempt,
                                                      meta={"live": [list(v) for v in view]}))


class RelayedView:
    """A rank's side: receives its leader's ``RANK_VIEW``s on ``transport`` (the rank's own
    endpoint, opened as the member) and answers ``peers()`` for the exchange attempt under
    way (``begin``) with the latest view the leader sent for it; before the first, the
    round's members as they were when it began."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self._lock = threading.Lock()
        self._attempt: tuple[int, int] = (-1, -1)
        self._start: list[PeerInfo] = []
        self._endpoints: dict[str, str] = {}
        self._view: View | None = None
        transport.on(RANK_VIEW, self._on_view)

    def begin(self, round: int, attempt: int, members: Sequence[PeerInfo]) -> None:
        with self._lock:
            self._attempt = (round, attempt)
            self._start = list(members)
            self._endpoints = {p.id: p.endpoint for p in members}
            self._view = None

    def peers(self) -> list[PeerInfo]:
        with self._lock:
            if self._view is None:
                return list(self._start)
            return [PeerInfo(i, self._endpoints.get(i, ""), session=s) for i, s in self._view]

    def _on_view(self, msg: Message) -> None:
        if msg.sender != self.transport.node_id or (self.transport.key and msg.pub != self.transport.node_key.public):
            self.transport.drops.drop("NotFromLeader", f"{RANK_VIEW} from {msg.sender[:64]}: only this member's "
                                      "leader sends it")
            return
        with self._lock:
            if (msg.round, msg.attempt) == self._attempt:
                self._view = [(str(i), str(s)) for i, s in msg.meta["live"]]
