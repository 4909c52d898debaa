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
its record shows a later round (it averaged this round elsewhere); a node that adopted a
peer's state runs no earlier round, so it tells the live peers (SKIP: leaders stop
expecting it) and answers a JOIN for one with ROSTER(status=absent) (the joiner elects
the next smallest id); a node that follows another leader answers a JOIN with
ROSTER(status=redirect, its leader), always a smaller id, so joiners whose views differ
still end up in one group. If the leader dies, followers get no roster or no decision by their
deadline and skip the round (weights unchanged everywhere, so still consistent); its DHT
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

import torch

from .codecs import CodecError, Compressor, Layout
from .flat import flat_of, unflatten
from .membership import PeerInfo, ViewUnknown
from .messages import AVG, DECISION, DONE, JOIN, PART, ROSTER, SKIP
from .transport import AbsenceWatch, Transport
from .wire import Message

log = logging.getLogger(__name__)

MIN_JUDGED_NUMEL = 64  # norms of fewer values are too noisy to call one an outlier


@dataclass(frozen=True)
class CollectiveTimeouts:
    """Every wait in a round has one of these deadlines (seconds)."""

    matchmaking_s: float = 30.0
    join_s: float = 60.0
    allreduce_s: float = 60.0
    decision_s: float = 30.0
    max_attempts: int = 3


@dataclass(frozen=True)
class Member:
    id: str
    endpoint: str
    weight: float = 1.0


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


def split_bounds(numel: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal contiguous slices of a ``numel`` vector."""
    base, extra = divmod(numel, parts)
    bounds = [0]
    for j in range(parts):
        bounds.append(bounds[-1] + base + (1 if j < extra else 0))
    return bounds


HELD_UP_ROUNDS = 2
"""How many rounds behind the usual window a live peer may be and still be waited for."""


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
        self.chunk_bytes = chunk_bytes
        self.max_norm_ratio = max_norm_ratio
        self.suspects: list[str] = []  # the last round's excluded outliers (this node's view)
        self.departed = departed or (lambda: ())
        self.absent_grace_s = absent_grace_s
        self._last_seen: dict[str, float] = {}  # peer endpoint -> monotonic time it was last in view
        heard_at = lambda node: transport.last_heard.get(node, 0.0)  # noqa: E731
        self._silent_leaders = PassOver(heard_at)  # leaders that sent no roster
        self._silent_followers = PassOver(heard_at)  # expected peers whose JOIN did not come
        self._finished_round = -1
        self._out: torch.Tensor | None = None
        self._lock = threading.Lock()
        self.check_s = 1.0  # how often a wait on peers looks at the DHT for those that left
        self._absent_below = 0  # this node runs no round before this one (it adopted a state)
        self._peers_absent: dict[str, int] = {}  # peer id -> the first round it runs (its SKIP)
        self._following: tuple[int, str, str] | None = None  # (round, leader id, endpoint) while a follower
        transport.on(JOIN, self._on_join)
        transport.on(SKIP, self._on_skip)

    # ------------------------------------------------------------ entry point
    def all_reduce(
        self, round: int, tensors: Sequence[torch.Tensor], weight: float = 1.0, state_hash: str = "",
        peer_round: int | None = None, lag: int = 1,
    ) -> RoundResult:
        """Average ``tensors`` (any shapes, any float dtype) over this round's group.

        On "ok" every member returns bit-identical float32 tensors of the input shapes. They
        are views of a buffer this object reuses: valid until the next call.

        ``peer_round``: the round peers announce in the DHT when it differs from the
        collective's round id (DDP averages every step but announces once per H steps).
        ``lag``: how many rounds behind ``peer_round`` a peer may be announced and still be
        expected (CO2, which has no barrier between rounds, needs 2)."""
        self.transport.mailbox.prune(round)
        self.suspects = []
        start = time.monotonic()
        enc0, dec0 = self.compressor.encode_s, self.compressor.decode_s
        announced = round if peer_round is None else peer_round
        try:
            live = self.live_peers()
        except ViewUnknown as exc:
            # who is live is unknown: averaging with nobody would commit a solo round as
            # "ok" while the members this node trained with may be alive
            self._finish(round)
            self.compressor.discard()
            return RoundResult("skipped", round, reason=f"membership unknown ({exc})",
                               timings={"total_s": time.monotonic() - start})
        for p in live:
            self.transport.name_peer(p.endpoint, p.id)
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
        absent = self._absent_at(round)
        peers = [p for p in peers if p.id not in silent and p.id not in absent]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("round %d (announced %d): live %s, passed over %s, absent %s", round, announced,
                      sorted((p.id, p.round) for p in live), sorted(silent), sorted(absent))
        leader = min([self.me, *(p.id for p in peers)])
        endpoint = next((p.endpoint for p in peers if p.id == leader), "")
        tried: set[str] = set()
        try:
            while True:
                if leader == self.me:
                    self._set_following(None)
                    result = self._lead(round, tensors, weight, state_hash, peers, visible, announced)
                    break
                self._set_following((round, leader, endpoint))
                followed = self._follow(round, tensors, weight, state_hash, leader, endpoint, announced + lag - 1)
                if isinstance(followed, RoundResult):
                    result = followed
                    break
                # the leader is not in this round (None), or follows a smaller id: go there
                # (each id is tried once: a redirect can neither loop nor go on forever)
                tried.add(leader)
                peers = [p for p in peers if p.id not in tried]
                if followed is not None and followed[0] < leader and followed[0] not in tried:
                    leader, endpoint = followed
                else:
                    leader = min([self.me, *(p.id for p in peers)])
                    endpoint = next((p.endpoint for p in peers if p.id == leader), "")
        finally:
            self._set_following(None)
            self._finish(round)
        # error feedback remembers what was dropped only if the round's values were used
        if result.status == "ok":
            self.compressor.commit()
        else:
            self.compressor.discard()
        result.timings["total_s"] = time.monotonic() - start
        result.timings["encode_s"] = self.compressor.encode_s - enc0
        result.timings["decode_s"] = self.compressor.decode_s - dec0
        return result

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

        def live() -> list[str]:
            try:
                return [p.id for p in self.live_peers()]
            except ViewUnknown:  # unknown is not gone: keep waiting for everyone
                return list(senders)

        return self.transport.mailbox.take_from_live(kind, round, attempt, senders, deadline, live, self.stop,
                                                     self.check_s, moved_on)

    # ------------------------------------------------------------------ leader
    def _past(self, announced: int) -> set[str]:
        """Peers whose DHT record shows a round past ``announced``: whatever their algorithm,
        a member announces at most ``announced`` while its sync of this round can still run,
        so these averaged this round elsewhere (a leader another view elected) or skipped it."""
        try:
            return {p.id for p in self.live_peers() if p.round > announced}
        except ViewUnknown:
            return set()

    def _absent_at(self, round: int) -> set[str]:
        """Peers that said (SKIP) they run no round before a later one."""
        with self._lock:
            return {node for node, first in self._peers_absent.items() if first > round}

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
        moved_on: set[str] = set()

        def past() -> set[str]:
            moved_on.update(self._past(announced) | self._absent_at(round))
            return moved_on | self.transport.mailbox.ahead(JOIN, round).keys()

        joins = self._wait_for(JOIN, round, 0, expected, time.monotonic() + t.matchmaking_s, moved_on=past)
        # nodes the DHT did not show yet may have joined too: take them as well
        for m in self.transport.mailbox.drain(JOIN, round):
            joins.setdefault(m.sender, m)
        for node in set(expected) - joins.keys() - moved_on - self.transport.mailbox.ahead(JOIN, round).keys():
            self._silent_followers.silent(node, round)
        members = [Member(self.me, self.transport.endpoint, weight)]
        for sender, m in sorted(joins.items()):
            if m.meta.get("state_hash") != state_hash:
                log.info("round %d: %s has state %s, leader has %s: told to resync",
                         round, sender, m.meta.get("state_hash"), state_hash)
                self._send(m.meta["endpoint"], ROSTER, round, 0, {"status": "resync"})
                continue
            members.append(Member(sender, m.meta["endpoint"], float(m.meta.get("weight", 1.0))))
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
                latest: int) -> RoundResult | tuple[str, str] | None:
        """``latest``: the furthest round a leader still working on this round may announce.
        None: the leader is not in this round (it adopted a later state): elect another;
        (id, endpoint): the leader follows that one this round."""
        t = self.timeouts
        skipped = dict(round=round, leader=leader, leader_endpoint=leader_endpoint)
        self._send(leader_endpoint, JOIN, round, 0, {
            "state_hash": state_hash, "weight": weight, "endpoint": self.transport.endpoint,
        })

        def leader_moved_on() -> list[str]:
            # a leader that announces a later round closed this one without this node (it
            # cannot reach it: a partition, a lost JOIN): no roster is coming, stop waiting
            if leader in self._absent_at(round):
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
            return (target, endpoint) if isinstance(target, str) and isinstance(endpoint, str) else None
        if status in ("resync", "closed"):
            return RoundResult("resync", reason=f"leader says {status}", **skipped)
        roster = self._parse_roster(reply)
        if roster is None:
            return RoundResult("skipped", reason="malformed roster", **skipped)
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

    # ------------------------------------------------------------- data phase
    def _output(self, numel: int) -> torch.Tensor:
        """The result buffer, reused across rounds: allocating (and page-faulting) a fresh
        model-sized buffer every round costs more than the arithmetic."""
        if self._out is None or self._out.numel() != numel:
            self._out = torch.empty(numel, dtype=torch.float32)
        return self._out

    def _exchange(self, round, attempt, tensors, roster: list[Member]):
        """Phases 1 and 2. Returns (flat averaged vector or None, owners whose part is missing).

        Parts travel in chunks of at most ``chunk_bytes``: the owner adds chunk c while
        chunk c+1 is on the wire, and ZeroMQ's receive buffers stay small enough for the
        allocator to reuse them (one 100 MB message per round costs fresh pages every time).
        Chunks go out zero-copy, as views of ``flat`` and of the output buffer; neither is
        written again before every member has reported the round done (or was dropped)."""
        flat = flat_of(tensors)
        layout = Layout.of(tensors)
        n = len(roster)
        me = next(i for i, m in enumerate(roster) if m.id == self.me)
        bounds = split_bounds(flat.numel(), n)
        deadline = time.monotonic() + self.timeouts.allreduce_s
        my_weight = roster[me].weight
        # Phase 1: reduce-scatter. Every other member gets the part it owns, chunk by chunk,
        # interleaved across members so that all owners can start adding at once.
        self._send_parts(round, attempt, flat, bounds, roster, me, layout, {"weight": my_weight})
        out = self._output(flat.numel())
        mine = out[bounds[me]:bounds[me + 1]]
        own = flat[bounds[me]:bounds[me + 1]]
        if my_weight == 1.0:
            mine.copy_(own)
        else:
            torch.mul(own, my_weight, out=mine)
        failed: set[str] = set()  # members whose part did not arrive intact
        suspects: set[str] = set()  # members whose contribution is an outlier (self included)
        # a member that dies mid-round is not waited for past its DHT record's expiry
        watch = AbsenceWatch(lambda: [p.id for p in self.live_peers()])
        for lo, hi in self._chunks(mine.numel()):
            got: list[tuple[str, torch.Tensor, float]] = []
            for m in roster:  # roster order, not arrival order: the owner's sum is reproducible
                if m.id == self.me or m.id in failed:
                    continue
                msg, _ = self.transport.mailbox.take_first_from_live(
                    PART, round, attempt, lambda x, s=m.id, c=lo: x.sender == s and x.meta.get("offset") == c,
                    deadline, lambda s=m.id: {s}, watch, stop=self.stop, check_s=self.check_s)
                part = None if msg is None else self._decode(msg, me, bounds[me] + lo, hi - lo, layout)
                if part is None:
                    failed.add(m.id)
                    continue
                got.append((m.id, part, float(msg.meta.get("weight", 1.0))))
            outliers = self._outliers([(self.me, own[lo:hi], my_weight), *got])
            if outliers:
                log.warning("round %d: contributions of %s are outliers (norm > %g x the group's median); "
                            "excluded", round, sorted(outliers), self.max_norm_ratio)
                suspects |= outliers
                failed |= outliers - {self.me}
            total = my_weight
            for sender, part, w in got:
                if sender in outliers:
                    continue
                mine[lo:hi].add_(part, alpha=w)
                total += w  # per chunk: a member that died mid-send counts where it arrived
            if total > 0:
                mine[lo:hi].div_(total)
            else:  # only zero-weight contributions (a replica that just restored itself)
                mine[lo:hi].copy_(own[lo:hi])
        self.suspects = sorted({*self.suspects, *suspects})
        # Phase 2: all-gather. My averaged part goes to everyone; theirs land in `out`.
        # A member that failed phase 1 is not waited for again (it is most likely dead);
        # the others get a fresh deadline, since they may have waited for it too.
        self._send_average(round, attempt, out, bounds, roster, me, layout)
        deadline = time.monotonic() + self.timeouts.allreduce_s
        expected = {(m.id, lo) for j, m in enumerate(roster) if j != me and m.id not in failed
                    for lo, _ in self._chunks(bounds[j + 1] - bounds[j])}
        index = {m.id: j for j, m in enumerate(roster)}
        while expected:
            msg, gone = self.transport.mailbox.take_first_from_live(
                AVG, round, attempt, lambda x, want=expected: (x.sender, x.meta.get("offset")) in want,
                deadline, lambda want=expected: {s for s, _ in want}, watch, stop=self.stop, check_s=self.check_s)
            if gone:  # left the swarm: their parts are missing, the others' may still come
                failed |= gone
                expected = {(s, c) for s, c in expected if s not in gone}
                continue
            if msg is None:
                break
            j, lo = index[msg.sender], msg.meta["offset"]
            hi = min(lo + self._chunk_numel, bounds[j + 1] - bounds[j])
            piece = self._decode(msg, j, bounds[j] + lo, hi - lo, layout)
            if piece is None:  # a bad chunk spoils its owner's whole part
                failed.add(msg.sender)
                expected = {(s, c) for s, c in expected if s != msg.sender}
                continue
            out[bounds[j] + lo:bounds[j] + hi].copy_(piece)
            expected.discard((msg.sender, lo))
        # an outlier of my own: report myself, so that the group goes on without my values
        missing = sorted(failed | {sender for sender, _ in expected} | (suspects & {self.me}))
        if missing:
            return None, missing
        return out, []

    def _outliers(self, contributions: list[tuple[str, torch.Tensor, float]]) -> set[str]:
        """Senders whose contribution's norm exceeds ``max_norm_ratio`` times the group's
        (lower) median norm. With two members that is the larger one, if it is that much
        larger: no honest pair of replicas differs so much, and one of them is then left
        out rather than both averaging poison. Zero-weight contributions (a replica that
        just restored itself) count for nothing and are not judged."""
        if self.max_norm_ratio <= 0 or contributions[0][1].numel() < MIN_JUDGED_NUMEL:
            return set()
        norms = [(sender, float(torch.linalg.vector_norm(t))) for sender, t, w in contributions if w > 0]
        if len(norms) < 2:
            return set()
        values = sorted(n for _, n in norms)
        median = values[(len(values) - 1) // 2]
        if median == 0:  # e.g. rows of an embedding only some replicas' batches touched
            return set()
        return {sender for sender, n in norms if n > self.max_norm_ratio * median}

    @property
    def _chunk_numel(self) -> int:
        return max(1, self.chunk_bytes // 4)

    def _chunks(self, numel: int) -> list[tuple[int, int]]:
        step = self._chunk_numel
        return [(lo, min(lo + step, numel)) for lo in range(0, numel, step)] or [(0, 0)]

    def _send_parts(self, round, attempt, flat, bounds, roster, me, layout, extra):
        """Phase 1: part j of my vector to its owner j, chunk by chunk, interleaved across
        owners so that all of them can start adding at once. Compressed on the way (stream
        "part": this node's own contribution, with its own error feedback)."""
        streams = [(m, j) for j, m in enumerate(roster) if j != me]
        longest = max((len(self._chunks(bounds[j + 1] - bounds[j])) for _, j in streams), default=0)
        for c in range(longest):
            for m, j in streams:
                chunks = self._chunks(bounds[j + 1] - bounds[j])
                if c >= len(chunks):
                    continue
                lo, hi = chunks[c]
                start = bounds[j] + lo
                payload, meta, _ = self.compressor.encode("part", flat[start:bounds[j] + hi], start, layout)
                self._send(m.endpoint, PART, round, attempt, {"part": j, "offset": lo, "codec": meta, **extra},
                           payload)

    def _send_average(self, round, attempt, out, bounds, roster, me, layout):
        """Phase 2: my averaged part to every member. Each chunk is encoded once (stream
        "avg") and this node keeps exactly what the others will decode, so that every
        member ends with the same bits whatever the codec."""
        for lo, hi in self._chunks(bounds[me + 1] - bounds[me]):
            start = bounds[me] + lo
            view = out[start:bounds[me] + hi]
            payload, meta, decoded = self.compressor.encode("avg", view, start, layout)
            if self.compressor.lossy:
                payload = [t.clone() for t in payload]  # they must not alias `view`, rewritten next
                view.copy_(decoded)
            for j, m in enumerate(roster):
                if j != me:
                    self._send(m.endpoint, AVG, round, attempt, {"part": me, "offset": lo, "codec": meta}, payload)

    def _decode(self, msg: Message, part: int, start: int, numel: int, layout: Layout) -> torch.Tensor | None:
        if msg.meta.get("part") != part:
            log.warning("%s from %s: part %r, expected %d; ignored", msg.kind, msg.sender,
                        msg.meta.get("part"), part)
            return None
        try:
            t = self.compressor.decode(msg.tensors, msg.meta.get("codec", {}), start, numel, layout)
        except CodecError as exc:
            log.warning("%s from %s rejected: %s", msg.kind, msg.sender, exc)
            return None
        # NaN/Inf anywhere makes the sum non-finite; one read pass, no temporary mask
        if not torch.isfinite(t.sum()):
            log.warning("%s from %s holds NaN/Inf; ignored", msg.kind, msg.sender)
            self.suspects = sorted({*self.suspects, msg.sender})
            return None
        return t

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _roster_meta(status: str, roster: list[Member], **extra) -> dict:
        return {"status": status, **extra,
                "members": [[m.id, m.endpoint, m.weight] for m in roster]}

    @staticmethod
    def _parse_roster(msg: Message) -> list[Member] | None:
        try:
            members = [Member(str(i), str(e), float(w)) for i, e, w in msg.meta["members"]]
        except (KeyError, TypeError, ValueError):
            log.warning("malformed roster from %s: %r", msg.sender, msg.meta)
            return None
        return members or None

    def _send(self, endpoint: str, kind: str, round: int, attempt: int, meta: dict,
              tensors: list[torch.Tensor] | None = None) -> None:
        self.transport.send(endpoint, Message(kind, round=round, attempt=attempt, meta=meta,
                                              tensors=tensors or []))

    def _on_join(self, msg: Message) -> None:
        """I/O thread: a JOIN for a round this node already finished is answered at once."""
        endpoint = msg.meta.get("endpoint")
        if not isinstance(endpoint, str):
            log.warning("JOIN from %s without an endpoint; ignored", msg.sender)
            return
        self._silent_followers.heard(msg.sender)  # it reaches this node: wait for it again
        with self._lock:
            late = msg.round <= self._finished_round
            absent = not late and msg.round < self._absent_below
            following = self._following if self._following is not None and self._following[0] == msg.round else None
            if not (late or absent or following):
                self.transport.file(msg)
        if late or absent:
            self._send(endpoint, ROSTER, msg.round, 0, {"status": "closed" if late else "absent"})
        elif following:
            self._send(endpoint, ROSTER, msg.round, 0, self._redirect(following))

    @staticmethod
    def _redirect(following: tuple[int, str, str]) -> dict:
        return {"status": "redirect", "leader": following[1], "endpoint": following[2]}

    def _set_following(self, following: tuple[int, str, str] | None) -> None:
        """While this node follows a leader, JOINs sent to it for that round (its view made
        it the leader of someone else's) are redirected there, the filed ones at once."""
        with self._lock:
            self._following = following
            filed = self.transport.mailbox.drain(JOIN, following[0]) if following is not None else []
        for m in filed:
            self._send(m.meta["endpoint"], ROSTER, m.round, 0, self._redirect(following))

    def _on_skip(self, msg: Message) -> None:
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
            filed = self.transport.mailbox.drain_before(JOIN, round)
        for m in filed:
            status = "closed" if m.round <= self._finished_round else "absent"
            self._send(m.meta["endpoint"], ROSTER, m.round, 0, {"status": status})
        for endpoint in peers:
            self._send(endpoint, SKIP, round, 0, {})

    def _finish(self, round: int) -> None:
        with self._lock:
            self._finished_round = max(self._finished_round, round)
            leftovers = [m for r in range(max(0, round - 1), round + 1)
                         for m in self.transport.mailbox.drain(JOIN, r)]
        for m in leftovers:
            self._send(m.meta["endpoint"], ROSTER, m.round, 0, {"status": "closed"})
