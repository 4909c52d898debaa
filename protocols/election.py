"""Whom a node asks to lead it next in one round, when the leader it elected does not lead
it (pure bookkeeping for :mod:`.collective`).

The smallest id in view leads. One that is not in the round (it adopted a later state, or
is fetching one) answers "absent"; one that follows another leader redirects there. Views
and news differ from node to node, so a redirect may point at a leader this node was just
told is absent, by a follower that has not heard it yet: that follower is about to lead
(or to redirect to its next choice), so it is asked again, for as long as a follower waits
for a leader. Electing past it split the round: this node led alone, and the other waited
for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .membership import PeerInfo


@dataclass(frozen=True)
class Redirect:
    """A follower's answer to a JOIN: it follows ``leader`` this round; ``grouped``: that
    leader's roster has it already (the leader is certainly in the round)."""

    leader: str
    endpoint: str
    grouped: bool = False


class Election:
    def __init__(self, me: str, peers: Sequence[PeerInfo], patience_until: float):
        """``peers``: those at this round; ``patience_until`` (time.monotonic()): until when
        a follower that redirects to an absent leader is asked again."""
        self.me = me
        self.peers = list(peers)
        self.patience_until = patience_until
        self._tried: set[str] = set()
        self._absent: set[str] = set()  # leaders that answered "absent"
        self._came_from: dict[str, tuple[str, str]] = {}  # leader -> the node that redirected here
        self._second_look: set[str] = set()  # absent leaders a grouped follower vouched for
        self.leader, self.endpoint = self._smallest()

    def _smallest(self) -> tuple[str, str]:
        leader = min([self.me, *(p.id for p in self.peers)])
        return leader, next((p.endpoint for p in self.peers if p.id == leader), "")

    def next(self, answer: Redirect | None, now: float) -> bool:
        """The leader asked answered "absent" (None) or redirected: move to the next one to
        ask. True: it is the same follower again, which has not heard the news yet (the
        caller gives it a moment before asking). Each id is otherwise asked once, and
        redirects go to smaller ids only: this ends."""
        asked = (self.leader, self.endpoint)
        self._tried.add(asked[0])
        if answer is None:
            self._absent.add(asked[0])
        self.peers = [p for p in self.peers if p.id not in self._tried]
        if answer is not None and answer.leader < asked[0]:
            target = answer.leader
            # an absent leader is in the round after all if its roster has the follower (it
            # was away a moment, fetching a state): one more look
            fresh = target not in self._tried or (answer.grouped and target not in self._second_look)
            if fresh:
                if target in self._tried:
                    self._second_look.add(target)
                self._came_from[target] = asked
                self.leader, self.endpoint = target, answer.endpoint
                return False
        back = self._came_from.get(asked[0]) if answer is None else asked
        if back is not None and now < self.patience_until and (answer is None or answer.leader in self._absent):
            self.leader, self.endpoint = back
            return answer is not None
        self.leader, self.endpoint = self._smallest()
        return False
