"""Group all-reduce (weighted average) with leader-based matchmaking and a commit step.

One round, as every member sees it::

    Phase 0  matchmaking   follower --JOIN(round, state_hash, weight)--> leader
                           leader waits for every live peer at this round (DHT view) or the
                           matchmaking deadline, then --ROSTER(members)--> each joiner.
                           Joiners whose state_hash differs from the leader's get
                           ROSTER(status=resync) and fetch the leader's state instead.
    Phase 1  reduce-scatter  the flat float32 vector is cut into one part per member; member i
                           sends part j to member j and averages the part it owns from what
                           arrived before the deadline (weighted by contributors received).
    Phase 2  all-gather    each owner sends its averaged part to every member.
    Phase 3  commit        each member reports DONE(ok | missing owners) to the leader. The
                           leader sends COMMIT when every responder has every part, RETRY
                           with the responders as the new roster when someone is missing
                           (their local inputs are unchanged, so the round is simply redone
                           without the dead member), or ABORT after ``max_attempts``.

Why a commit step: without it, a member that died between sending its averaged part to
one survivor and to another would leave the survivors with different results, and
replicas that must be bit-identical would silently drift. With it, survivors either all
apply the same result or all skip the round. Only the leader's decision counts, never a
local reading of the DHT, so members cannot disagree on who is in.

The leader is the smallest node id among live peers announced at this round (everyone
can compute it). Views differ while records propagate, so a few rules keep a wrong guess
from stalling anyone for a whole timeout: a leader stops waiting for an expected peer once
its record shows a later round, or it answers the leader's ASK with PAST (it averaged
this round elsewhere: records show rounds, not the syncs inside one); a node that adopted a
peer's state runs no earlier round, so it tells the live peers (SKIP: leaders stop
expecting it) and answers a JOIN for one with ROSTER(status=absent) (the joiner elects
the next smallest id); a node that follows another leader answers a JOIN with
ROSTER(status=redirect, its leader), always a smaller id, so joiners whose views differ
still end up in one group (:mod:`.election`: whom a joiner asks next). If the leader dies,
followers get no roster or no decision by their deadline and skip the round (weights
unchanged everywhere, so still consistent); its DHT
record expires and the next smallest id leads the next round. Any member that still ends
up inconsistent is caught by the state-hash check at the next JOIN and resynchronized.

Each member sends about 2·(N−1)/N of the vector, like a ring all-reduce, but in two
latency steps instead of 2·(N−1), which is what matters on slow, far-apart links.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .codecs import Compressor
from .data_phase import DataPhase, Member
from .election import Election, Redirect
from .flat import unflatten
from .join_desk import JoinDesk
from .membership import PeerInfo, ViewUnknown
from .messages import ASK, DECISION, DONE, JOIN, PAST, ROSTER
from .transport import ABSENCE_CHECK_S, Transport
from .wire import Message

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CollectiveTimeouts:
    """Every wait in a round has one of these deadlines (seconds)."""

    matchmaking_s: float = 30.0
    join_s: float = 60.0
    allreduce_s: float = 60.0
    decision_s: float = 30.0
    max_attempts: int = 3


@dataclass
class RoundResult:
    """What happened to one round. ``tensors`` is set only when status == "ok"."""

    status: str  # "ok" | "skipped" | "resync"
    round: int
    tensors: list[torch.Tensor] | None = None
    group: tuple[str, ...] = ()
    attempts: int = 0
    leader: str = ""
    leader_endpoint: str = ""
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    suspects: list[str] = field(default_factory=list)  # members excluded as outliers


class PassOver:
    """Peers that did not answer lately (stopped, or across a partition while the DHT still
    shows them): not waited for during a pass-over of ``first`` rounds that doubles, up to
    ``cap``, each time they stay silent, and ends as soon as they are heard from. A long
    partition then costs each side a timeout now and then, not one every round."""

    def __init__(self, heard_at: Callable[[str], float] = lambda node: 0.0, first: int = 2, cap: int = 64):
        """``heard_at(node)``: when any message from ``node`` last arrived (time.monotonic):
        one that arrives after the node was found silent ends its pass-over (a node behind
        fetches state from the leader before it joins a round again)."""
        self.heard_at, self.first, self.cap = heard_at, first, cap
        # node -> (last round passed over, span, when it was found silent)
        self._until: dict[str, tuple[int, int, float]] = {}

    def silent(self, node: str, round: int) -> None:
        span = min(self.cap, 2 * self._until[node][1]) if node in self._until else self.first
        self._until[node] = (round + span, span, time.monotonic())

    def heard(self, node: str) -> None:
        self._until.pop(node, None)

    def passed_over(self, node: str, round: int) -> bool:
        entry = self._until.get(node)
        if entry is None or entry[0] < round:
            return False
        if self.heard_at(node) > entry[2]:
            self.heard(node)
            return False
        return True


REASK_PAUSE_S = 0.05
"""How long a node waits before asking a follower again that redirected it to an absent leader."""

LOOKUP_RETRY_PAUSES_S = (0.2, 0.5)
"""Pauses before asking the DHT again when the lookup at a round's start was incomplete."""

HELD_UP_ROUNDS = 2
"""How many rounds behind the usual window a live peer may be and still be waited for."""


class RankExchange(Protocol):
    """The other processes of a member made of several (each with its own endpoint), as
    its first rank drives them through a round: every attempt's data phases run on all of
    them at once, each over its own region of the vector (:mod:`.regions`)."""

    endpoints: Sequence[str]  # every rank's, in rank order (the first is this transport's)

    def exchange(self, data: DataPhase, round: int, attempt: int, tensors: Sequence[torch.Tensor],
                 roster: list[Member]) -> tuple[torch.Tensor | None, list[str], list[str]]:
        """One attempt's phases 1 and 2 on every rank (this one through ``data``): the whole
        averaged vector or None, the owners some rank misses, the suspects any rank saw."""
        ...

    def finish(self, round: int, ok: bool) -> None:
        """Round ``round`` is over (committed: ``ok``); the other ranks stop waiting for attempts."""
        ...


class GroupAllReduce:
    """Averages lists of tensors with whichever live peers are at the same round."""

    def __init__(
        self,
        transport: Transport,
        live_peers: Callable[[], list[PeerInfo]],
        timeouts: CollectiveTimeouts | None = None,
        compressor: Compressor | None = None,
        stop: threading.Event | None = None,
        chunk_bytes: int = 4 << 20,
        max_norm_ratio: float = 10.0,
        departed: Callable[[], Iterable[str]] | None = None,
        absent_grace_s: float = 60.0,
        ranks: RankExchange | None = None,
    ):
        """``max_norm_ratio``: a contribution whose norm exceeds this many times the group's
        median is excluded from the round and its sender reported as a suspect (0: off).
        ``departed``: endpoints of the peers that left cleanly (the DHT's ``left`` records).
        ``absent_grace_s``: how long a member this node averaged with, or saw live, counts
        as maybe-alive after it drops out of view without leaving: a view emptied by a
        lookup that went partial after a long stall looks like everyone died."""
        self.transport = transport
        self.me = transport.node_id
        self.live_peers = live_peers
        self.timeouts = timeouts or CollectiveTimeouts()
        self.compressor = compressor or Compressor("none")
        self.stop = stop
        self.suspects: list[str] = []  # the last round's excluded outliers (this node's view)
        self.data = DataPhase(transport, self.compressor, live_peers, self.timeouts.allreduce_s, stop, chunk_bytes,
                              max_norm_ratio)
        self.departed = departed or (lambda: ())
        self.absent_grace_s = absent_grace_s
        self._last_seen: dict[str, float] = {}  # peer endpoint -> monotonic time it was last in view
        heard_at = lambda node: transport.last_heard.get(node, 0.0)  # noqa: E731
        self._silent_leaders = PassOver(heard_at)  # leaders that sent no roster
        self._silent_followers = PassOver(heard_at)  # expected peers whose JOIN did not come
        self.check_s = ABSENCE_CHECK_S
        self._data_start, self._data_s = 0.0, 0.0  # the round at hand's (see all_reduce's timings)
        self.desk = JoinDesk(transport, self._silent_followers.heard)
        self.ranks = ranks

    # ------------------------------------------------------------ entry point
    def all_reduce(
        self, round: int, tensors: Sequence[torch.Tensor], weight: float = 1.0, state_hash: str = "",
        peer_round: int | None = None, lag: int = 1, span: int = 1,
    ) -> RoundResult:
        """Average ``tensors`` (any shapes, any float dtype) over this round's group.

        On "ok" every member returns bit-identical float32 tensors of the input shapes. They
        are views of a buffer this object reuses: valid until the next call.

        ``peer_round``: the round peers announce in the DHT when it differs from the
        collective's round id (DDP averages every step but announces once per H steps).
        ``lag``: how many rounds behind ``peer_round`` a peer may be announced and still be
        expected (CO2, which has no barrier between rounds, needs 2). ``span``: how many sync
        periods the input covers (see ``DataPhase.exchange``)."""
        self.transport.mailbox.prune(round)
        self.suspects = []
        start = time.monotonic()
        self._data_start, self._data_s = 0.0, 0.0
        enc0, dec0 = self.compressor.encode_s, self.compressor.decode_s
        announced = round if peer_round is None else peer_round
        try:
            live = self._lookup_with_retries()
        except ViewUnknown as exc:
            # who is live is unknown: averaging with nobody would commit a solo round as
            # "ok" while the members this node trained with may be alive
            self.desk.finish(round)
            self.compressor.discard()
            if self.ranks is not None:
                self.ranks.finish(round, False)
            return RoundResult("skipped", round, reason=f"membership unknown ({exc})",
                               timings={"total_s": time.monotonic() - start})
        for p in live:
            self.transport.name_peer(p.endpoint, p.id)
        self.data.begin(span, {p.id: p.session for p in live})
        # a peer that announced the previous round is most likely finishing it (its DHT record
        # lags by up to a refresh): expect it too, or a leader that runs ahead would average
        # alone and every short round would end in a resync. So is a member held up a few
        # rounds more (told "closed", it adopts this node's state and joins); one further
        # behind is catching up from older state (a restart, a late join): not waited for
        peers = [p for p in live if announced - lag - HELD_UP_ROUNDS <= p.round <= announced and p.id != self.me]
        # a leader that sent no roster lately (stopped, or across a partition) is passed
        # over for a few rounds: the members that can reach each other elect their own
        silent = {p.id for p in peers if self._silent_leaders.passed_over(p.id, round)}
        # with no peer at this round but live peers that have trained elsewhere (past it:
        # this node fell behind; before it: this node ran ahead of the members it trained
        # with), it skips the round (its caller catches up or rejoins them) instead of
        # committing it alone as "ok". A joiner still starting (round 0) does not count.
        recent = self._recently_seen(live)
        visible = bool(peers) or any(p.id != self.me and p.round > 0 for p in live) or recent
        absent = self.desk.absent_at(round)
        peers = [p for p in peers if p.id not in silent and p.id not in absent]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("round %d (announced %d): live %s, passed over %s, absent %s", round, announced,
                      sorted((p.id, p.round) for p in live), sorted(silent), sorted(absent))
        election = Election(self.me, peers, time.monotonic() + self.timeouts.join_s)
        try:
            while True:
                leader, endpoint = election.leader, election.endpoint
                if leader == self.me:
                    self.desk.set_following(None)
                    result = self._lead(round, tensors, weight, state_hash, election.peers, visible, announced)
                    break
                self.desk.set_following((round, leader, endpoint))
                followed = self._follow(round, tensors, weight, state_hash, leader, endpoint, announced + lag - 1)
                if isinstance(followed, RoundResult):
                    result = followed
                    break
                # the leader is not in this round (None), or follows another: ask the next
                if election.next(followed, time.monotonic()):
                    self._pause(REASK_PAUSE_S)
        finally:
            self.desk.set_following(None)
            self.desk.finish(round)
        # error feedback remembers what was dropped only if the round's values were used
        if result.status == "ok":
            self.compressor.commit()
        else:
            self.compressor.discard()
        total = result.timings["total_s"] = time.monotonic() - start
        # where the round's time went: matchmaking (until the first part is sent), the data
        # phases (every attempt), and the rest (the commit step, retries' decisions)
        match = (self._data_start - start) if self._data_start else total
        result.timings["matchmaking_s"] = match
        result.timings["data_s"] = self._data_s
        result.timings["commit_s"] = max(0.0, total - match - self._data_s)
        result.timings["encode_s"] = self.compressor.encode_s - enc0
        result.timings["decode_s"] = self.compressor.decode_s - dec0
        if self.ranks is not None:
            self.ranks.finish(round, result.status == "ok")
        return result

    def _lookup_with_retries(self) -> list[PeerInfo]:
        """The live peers at a round's start. A lookup that came back partial (one DHT node
        slow to answer on a busy machine: seen with 16 nodes on 2 cores) is asked again
        after a pause before the round is given up as ``membership unknown``: a skipped
        round costs every member its round, a second lookup a fraction of a second."""
        for pause in LOOKUP_RETRY_PAUSES_S:
            try:
                return self.live_peers()
            except ViewUnknown as exc:
                log.info("membership lookup incomplete (%s); asking again in %.2fs", exc, pause)
                self._pause(pause)
        return self.live_peers()

    def _recently_seen(self, live: list[PeerInfo]) -> bool:
        """Whether a peer that was in view lately is out of it without having left: then a
        round with nobody else is skipped, not committed alone (it may be alive, unseen)."""
        now = time.monotonic()
        for p in live:
            if p.id != self.me:
                self._last_seen[p.endpoint] = now
        for endpoint in self.departed():
            self._last_seen.pop(endpoint, None)
        self._last_seen = {e: t for e, t in self._last_seen.items() if now - t <= self.absent_grace_s}
        shown = {p.endpoint for p in live}
        return any(e not in shown for e in self._last_seen)

    def _wait_for(self, kind: str, round: int, attempt: int, senders: list[str], deadline: float,
                  moved_on: Callable[[], Iterable[str]] | None = None) -> dict[str, Message]:
        """Messages from ``senders``, not waiting for those that leave the DHT meanwhile (nor
        for those in ``moved_on()``: peers known to be past this round)."""

        def live() -> list[tuple[str, str]]:
            # (a ViewUnknown is a ConnectionError: the watch then keeps waiting for everyone)
            return [(p.id, p.session) for p in self.live_peers()]

        return self.transport.mailbox.take_from_live(kind, round, attempt, senders, deadline, live, self.stop,
                                                     self.check_s, moved_on, self.data.sessions)

    # ------------------------------------------------------------------ leader
    def _past(self, announced: int) -> set[str]:
        """Peers whose DHT record shows a round past ``announced``: whatever their algorithm,
        a member announces at most ``announced`` while its sync of this round can still run,
        so these averaged this round elsewhere (a leader another view elected) or skipped it."""
        try:
            return {p.id for p in self.live_peers() if p.round > announced}
        except ViewUnknown:
            return set()

    def _lead(self, round, tensors, weight, state_hash, peers, visible: bool, announced: int) -> RoundResult:
        """``peers``: whom to wait for; ``visible``: whether any peer is at this round at all
        (passed-over ones included): then a round with nobody else is skipped, never
        committed alone; ``announced``: the round members of this one show in the DHT."""
        t = self.timeouts
        # a peer whose JOIN did not come last time (stopped, or across a partition: the DHT
        # still shows it) is not waited for during a pass-over that doubles while it stays
        # silent; its JOIN is still taken if it comes, and any JOIN from it ends the pass-over
        expected = [p.id for p in peers if not self._silent_followers.passed_over(p.id, round)]
        # a peer that sent a JOIN for a later round, or whose DHT record moved past this
        # round, is done with it (this leader fell behind it, or views that differed elected
        # another leader it followed): it will never join here, so it is not waited for.
        # Waiting on would hold up the rounds of every peer that expects this node next.
        # DHT records show rounds, not the syncs inside one (DDP, Streaming), and lag: so
        # every check also asks the members still awaited, and those past it answer.
        moved_on: set[str] = set()
        endpoints = {p.id: p.endpoint for p in peers}

        def past() -> set[str]:
            moved_on.update(self._past(announced) | self.desk.absent_at(round))
            moved_on.update(m.sender for m in self.transport.mailbox.drain(PAST, round))
            for node in set(expected) - moved_on:
                self._send(endpoints[node], ASK, round, 0, {"endpoint": self.transport.endpoint})
            return moved_on | self.transport.mailbox.ahead(JOIN, round).keys()

        joins = self._wait_for(JOIN, round, 0, expected, time.monotonic() + t.matchmaking_s, moved_on=past)
        # nodes the DHT did not show yet may have joined too: take them as well
        for m in self.transport.mailbox.drain(JOIN, round):
            joins.setdefault(m.sender, m)
        for node in set(expected) - joins.keys() - moved_on - self.transport.mailbox.ahead(JOIN, round).keys():
            self._silent_followers.silent(node, round)
        members = [self._myself(weight)]
        for sender, m in sorted(joins.items()):
            if m.meta.get("state_hash") != state_hash:
                log.info("round %d: %s has state %s, leader has %s: told to resync",
                         round, sender, m.meta.get("state_hash"), state_hash)
                self._send(m.meta["endpoint"], ROSTER, round, 0, {"status": "resync"})
                continue
            members.append(Member(sender, m.meta["endpoint"], float(m.meta.get("weight", 1.0)),
                                  tuple(m.meta.get("ranks", ()))))
            self.transport.name_peer(m.meta["endpoint"], sender)
        if len(members) == 1 and (expected or visible):
            ahead = self.transport.mailbox.ahead(JOIN, round)
            if ahead:  # left behind: the peers are at later rounds, waiting on this node to lead them
                first = max(ahead.values(), key=lambda m: (m.round, m.sender))
                return RoundResult("resync", round, leader=first.sender, leader_endpoint=first.meta["endpoint"],
                                   reason=f"behind: {first.sender} is at round {first.round}")
            return RoundResult("skipped", round, leader=self.me, reason="no peer joined in time")
        roster = sorted(members, key=lambda m: m.id)
        in_group = True  # False once the others rejected this node's own contribution
        reported: set[str] = set()
        for attempt in range(t.max_attempts):
            if attempt == 0:
                for m in roster:
                    if m.id != self.me:
                        self._send(m.endpoint, ROSTER, round, 0, self._roster_meta("member", roster))
            flat, missing = self._exchange(round, attempt, tensors, roster) if in_group else (None, [])
            reported.update(self.suspects)
            others = [m for m in roster if m.id != self.me]
            dones = self._wait_for(DONE, round, attempt, [m.id for m in others], time.monotonic() + t.decision_s)
            for d in dones.values():
                reported.update(d.meta.get("suspect", []))
            responders = [m for m in roster if m.id == self.me or m.id in dones]
            # a round of several members that only the leader saw through is not committed:
            # the leader would hold an average nobody else applied, an "ok" round alone
            if not missing and all(d.meta.get("ok") for d in dones.values()) and (len(responders) > 1 or len(roster) == 1):
                for m in responders:
                    if m.id != self.me:
                        self._send(m.endpoint, DECISION, round, attempt, {"decision": "commit"})
                group = tuple(m.id for m in responders)
                if not in_group:  # the others averaged without this node: it adopts their state
                    source = next(m for m in responders if m.id != self.me)
                    return RoundResult("resync", round, group=group, attempts=attempt + 1, leader=source.id,
                                       leader_endpoint=source.endpoint, suspects=sorted(reported),
                                       reason="excluded: the group rejected this node's contribution")
                return RoundResult("ok", round, unflatten(flat, tensors), group, attempt + 1, self.me,
                                   self.transport.endpoint, suspects=sorted(reported))
            if attempt + 1 < t.max_attempts and len(roster) > 1:
                # drop members that did not report and owners whose part someone lacks (dead,
                # sent garbage, or sent an outlier): the survivors' inputs are intact, redo with
                # them. The leader too, if the others rejected its part: it then only coordinates.
                suspects = set(missing)
                for d in dones.values():
                    suspects.update(d.meta.get("missing", []))
                survivors = [m for m in responders if m.id not in suspects]
                if len(survivors) < 2:
                    break  # alone: averaging with nobody would only make this replica diverge
                log.warning("round %d attempt %d incomplete (missing %s, %d/%d reported): retrying "
                            "with %s", round, attempt, sorted(suspects), len(dones), len(others),
                            [m.id for m in survivors])
                for m in survivors:
                    if m.id != self.me:
                        self._send(m.endpoint, DECISION, round, attempt,
                                   self._roster_meta("retry", survivors, decision="retry"))
                for m in responders:
                    if m not in survivors and m.id != self.me:
                        self._send(m.endpoint, DECISION, round, attempt, {"decision": "excluded"})
                in_group = any(m.id == self.me for m in survivors)
                roster = survivors
        for m in roster:  # the attempt the followers are waiting on
            if m.id != self.me:
                self._send(m.endpoint, DECISION, round, attempt, {"decision": "abort"})
        return RoundResult("skipped", round, leader=self.me, attempts=attempt + 1, suspects=sorted(reported),
                           reason="aborted: no complete group")

    # ---------------------------------------------------------------- follower
    def _follow(self, round, tensors, weight, state_hash, leader, leader_endpoint,
                latest: int) -> RoundResult | Redirect | None:
        """``latest``: the furthest round a leader still working on this round may announce.
        None: the leader is not in this round (it adopted a later state): elect another;
        a Redirect: the leader follows that one this round."""
        t = self.timeouts
        skipped = dict(round=round, leader=leader, leader_endpoint=leader_endpoint)
        me = self._myself(weight)
        self._send(leader_endpoint, JOIN, round, 0, {
            "state_hash": state_hash, "weight": weight, "endpoint": self.transport.endpoint,
            **({"ranks": list(me.ranks)} if me.ranks else {}),
        })

        def leader_moved_on() -> list[str]:
            # a leader that announces a later round closed this one without this node (it
            # cannot reach it: a partition, a lost JOIN): no roster is coming, stop waiting
            if leader in self.desk.absent_at(round):
                return [leader]
            try:
                return [p.id for p in self.live_peers() if p.id == leader and p.round > latest]
            except ViewUnknown:
                return []

        reply = self._wait_for(ROSTER, round, 0, [leader], time.monotonic() + t.join_s,
                               moved_on=leader_moved_on).get(leader)
        if reply is None:
            self._silent_leaders.silent(leader, round)
            return RoundResult("skipped", reason="no roster from leader", **skipped)
        self._silent_leaders.heard(leader)
        status = reply.meta.get("status")
        if status == "absent":
            return None
        if status == "redirect":
            target, endpoint = reply.meta.get("leader"), reply.meta.get("endpoint")
            if not (isinstance(target, str) and isinstance(endpoint, str)):
                return None
            return Redirect(target, endpoint, reply.meta.get("grouped") is True)
        if status in ("resync", "closed"):
            return RoundResult("resync", reason=f"leader says {status}", **skipped)
        roster = self._parse_roster(reply)
        if roster is None:
            return RoundResult("skipped", reason="malformed roster", **skipped)
        self.desk.grouped(round, leader)
        for m in roster:
            self.transport.name_peer(m.endpoint, m.id)
        for attempt in range(t.max_attempts):
            flat, missing = self._exchange(round, attempt, tensors, roster)
            self._send(leader_endpoint, DONE, round, attempt, {"ok": not missing, "missing": missing,
                                                               "suspect": self.suspects})
            decision = self._wait_for(DECISION, round, attempt, [leader],
                                      time.monotonic() + t.decision_s + t.allreduce_s).get(leader)
            verdict = decision.meta.get("decision") if decision else None
            if verdict == "commit" and not missing:
                return RoundResult("ok", round, unflatten(flat, tensors),
                                   tuple(m.id for m in roster), attempt + 1, leader, leader_endpoint,
                                   suspects=self.suspects)
            if verdict == "retry":
                new = self._parse_roster(decision)
                if new is not None and any(m.id == self.me for m in new):
                    roster = new
                    continue
            reason = "no decision from leader" if decision is None else f"leader decided {verdict}"
            return RoundResult("skipped", attempts=attempt + 1, reason=reason, suspects=self.suspects, **skipped)
        return RoundResult("skipped", attempts=t.max_attempts, reason="out of attempts", **skipped)

    @property
    def check_s(self) -> float:
        """How often a wait on peers looks at the DHT for those that left or moved on."""
        return self._check_s

    @check_s.setter
    def check_s(self, seconds: float) -> None:
        self._check_s = self.data.check_s = seconds

    def _exchange(self, round, attempt, tensors, roster: list[Member]):
        """Phases 1 and 2 (see ``DataPhase.exchange``); the round's suspects so far."""
        began = time.monotonic()
        self._data_start = self._data_start or began
        if self.ranks is not None:
            flat, missing, suspects = self.ranks.exchange(self.data, round, attempt, tensors, roster)
            self.data.suspects |= set(suspects)
        else:
            flat, missing = self.data.exchange(round, attempt, tensors, roster)
        self._data_s += time.monotonic() - began
        self.suspects = sorted(self.data.suspects)
        return flat, missing

    def _myself(self, weight: float) -> Member:
        ranks = tuple(self.ranks.endpoints) if self.ranks is not None else ()
        return Member(self.me, self.transport.endpoint, weight, ranks)

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _roster_meta(status: str, roster: list[Member], **extra) -> dict:
        return {"status": status, **extra,
                "members": [[m.id, m.endpoint, m.weight, *([list(m.ranks)] if m.ranks else [])] for m in roster]}

    @staticmethod
    def _parse_roster(msg: Message) -> list[Member] | None:
        try:
            members = [Member(str(i), str(e), float(w), tuple(str(r) for r in ranks[0]) if ranks else ())
                       for i, e, w, *ranks in msg.meta["members"]]
        except (KeyError, TypeError, ValueError):
            log.warning("malformed roster from %s: %r", msg.sender, msg.meta)
            return None
        return members or None

    def _pause(self, seconds: float) -> None:
        if self.stop is not None:
            self.stop.wait(seconds)
        else:
            time.sleep(seconds)

    def expect(self, peers: Iterable[str]) -> None:
        """``peers`` are due in the coming rounds for a reason this collective cannot see (a
        pipeline plan admitted them again): the pass-over their earlier silence earned ends,
        or the first round they take part in would be closed before their JOIN comes."""
        for node in peers:
            self._silent_followers.heard(node)
            self._silent_leaders.heard(node)

    def away(self, round: int) -> None:
        """Fetching a peer's state at ``round`` (0: done; see ``JoinDesk.away``)."""
        self.desk.away(round)

    def skip_to(self, round: int, peers: Iterable[str]) -> None:
        """This node adopted a peer's state and runs no round before ``round`` (see
        ``JoinDesk.skip_to``)."""
        self.desk.skip_to(round, peers)

    def _send(self, endpoint: str, kind: str, round: int, attempt: int, meta: dict,
              tensors: list[torch.Tensor] | None = None) -> None:
        self.transport.send(endpoint, Message(kind, round=round, attempt=attempt, meta=meta,
                                              tensors=tensors or []))
