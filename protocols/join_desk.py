"""A node's front desk for JOINs of rounds it does not lead (see :mod:`.collective`): it
answers at once those for rounds it finished ("closed"), for rounds before a state it
adopted ("absent"), and for the round it follows another leader in ("redirect"); it tells
a leader that asks (ASK) whether this node is past the round that leader waits for it in
(PAST); and it keeps what peers said about the rounds they skip."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from .messages import ASK, JOIN, PAST, ROSTER, SKIP
from .transport import Transport
from .wire import Message

log = logging.getLogger(__name__)


class JoinDesk:
    def __init__(self, transport: Transport, heard: Callable[[str], None]):
        """``heard(node)``: called with the sender of every JOIN (it reaches this node)."""
        self.transport = transport
        self.heard = heard
        self._finished_round = -1
        self._absent_below = 0  # this node runs no round before this one (it adopted a state)
        self._peers_absent: dict[str, int] = {}  # peer id -> the first round it runs (its SKIP)
        self._following: tuple[int, str, str] | None = None  # (round, leader id, endpoint) while a follower
        self._grouped: tuple[int, str] | None = None  # (round, leader id) once that leader's roster has this node
        self._away_below = 0  # while fetching a state to adopt: no round before this one here
        self._lock = threading.Lock()
        transport.on(JOIN, self.on_join)
        transport.on(SKIP, self.on_skip)
        transport.on(ASK, self.on_ask)

    def absent_at(self, round: int) -> set[str]:
        """Peers that said (SKIP) they run no round before a later one."""
        with self._lock:
            return {node for node, first in self._peers_absent.items() if first > round}

    def on_join(self, msg: Message) -> None:
        """I/O thread: a JOIN this node will not lead is answered at once (see the module);
        the others wait in the mailbox for the leader's matchmaking."""
        endpoint = msg.meta.get("endpoint")
        if not isinstance(endpoint, str):
            log.warning("JOIN from %s without an endpoint; ignored", msg.sender)
            return
        self.heard(msg.sender)  # it reaches this node: wait for it again
        with self._lock:
            late = msg.round <= self._finished_round
            absent = not late and msg.round < max(self._absent_below, self._away_below)
            following = self._following if self._following is not None and self._following[0] == msg.round else None
            redirect = self._redirect(following) if following else None
            if not (late or absent or following):
                self.transport.file(msg)
        if late or absent:
            self._send(endpoint, msg.round, {"status": "closed" if late else "absent"})
        elif redirect:
            self._send(endpoint, msg.round, redirect)

    def _redirect(self, following: tuple[int, str, str]) -> dict:
        """(With the lock held.)"""
        grouped = self._grouped == following[:2]
        return {"status": "redirect", "leader": following[1], "endpoint": following[2], "grouped": grouped}

    def set_following(self, following: tuple[int, str, str] | None) -> None:
        """While this node follows a leader, JOINs sent to it for that round (its view made
        it the leader of someone else's) are redirected there, the filed ones at once."""
        with self._lock:
            self._following = following
            self._grouped = None
            filed = self.transport.mailbox.drain(JOIN, following[0]) if following is not None else []
            redirect = self._redirect(following) if following is not None else None
        for m in filed:
            self._send(m.meta["endpoint"], m.round, redirect)

    def grouped(self, round: int, leader: str) -> None:
        """This node is in the group ``leader`` formed for ``round`` (its roster came)."""
        with self._lock:
            self._grouped = (round, leader)

    def on_ask(self, msg: Message) -> None:
        """I/O thread: a leader waits for this node's JOIN of ``msg.round``. If this node
        finished that round, skips it, or is in another leader's group for it, no JOIN is
        coming: PAST says so (otherwise no answer: the JOIN may still come). Following another
        leader is not enough: that one may answer "absent", and this node then elects again.
        Fetching a later state is (``away``): the snapshot it waits for may wait on this very
        round, and the asking leader on this node's JOIN; if the fetch fails, this node finds
        the round closed and goes on."""
        with self._lock:
            g = self._grouped
            past = (msg.round <= self._finished_round or msg.round < max(self._absent_below, self._away_below)
                    or (g is not None and g[0] == msg.round and g[1] != msg.sender))
        if past:
            self.transport.send(msg.meta["endpoint"], Message(PAST, round=msg.round, attempt=0, meta={}))

    def on_skip(self, msg: Message) -> None:
        """I/O thread: a peer runs no round before ``msg.round`` (it adopted a later state)."""
        with self._lock:
            self._peers_absent[msg.sender] = max(msg.round, self._peers_absent.get(msg.sender, 0))
            if len(self._peers_absent) > 4096:  # senders are authenticated peers; still, bound it
                self._peers_absent.pop(next(iter(self._peers_absent)))

    def skip_to(self, round: int, peers: Iterable[str]) -> None:
        """This node adopted a peer's state and runs no round before ``round``: a JOIN for
        one (filed, or still to come) is answered "absent", and the endpoints in ``peers``
        are told, so that no leader waits for this node in one of them."""
        with self._lock:
            self._absent_below = max(self._absent_below, round)
        self._turn_away_before(round)
        for endpoint in peers:
            self.transport.send(endpoint, Message(SKIP, round=round, attempt=0, meta={}))

    def away(self, round: int) -> None:
        """While this node fetches a peer's state at ``round`` to adopt it (0: done), a JOIN
        for an earlier round is answered "absent": a peer that elected it leader must not wait
        on it meanwhile. Unlike ``skip_to`` it tells nobody and lasts only as long as the
        fetch: a fetch that fails leaves this node in its rounds."""
        with self._lock:
            self._away_below = round
        self._turn_away_before(round)

    def _turn_away_before(self, round: int) -> None:
        """Answer the JOINs filed for rounds before ``round``: this node leads none of them."""
        with self._lock:
            filed = self.transport.mailbox.drain_before(JOIN, round)
        for m in filed:
            status = "closed" if m.round <= self._finished_round else "absent"
            self._send(m.meta["endpoint"], m.round, {"status": status})

    def finish(self, round: int) -> None:
        """This node is done with ``round``: a JOIN for it or an earlier one is answered "closed"."""
        with self._lock:
            self._finished_round = max(self._finished_round, round)
            leftovers = [m for r in range(max(0, round - 1), round + 1)
                         for m in self.transport.mailbox.drain(JOIN, r)]
        for m in leftovers:
            self._send(m.meta["endpoint"], m.round, {"status": "closed"})

    def _send(self, endpoint: str, round: int, meta: dict) -> None:
        self.transport.send(endpoint, Message(ROSTER, round=round, attempt=0, meta=meta))
