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
can compute it). If the leader dies, followers get no roster or no decision by their
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .codecs import Codec, CodecError, IdentityCodec
from .membership import PeerInfo
from .transport import Transport
from .wire import Message

log = logging.getLogger(__name__)

JOIN, ROSTER, PART, AVG, DONE, DECISION = "JOIN", "ROSTER", "PART", "AVG", "DONE", "DECISION"


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


def split_bounds(numel: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal contiguous slices of a ``numel`` vector."""
    base, extra = divmod(numel, parts)
    bounds = [0]
    for j in range(parts):
        bounds.append(bounds[-1] + base + (1 if j < extra else 0))
    return bounds


class GroupAllReduce:
    """Averages lists of tensors with whichever live peers are at the same round."""

    def __init__(
        self,
        transport: Transport,
        live_peers: Callable[[], list[PeerInfo]],
        timeouts: CollectiveTimeouts | None = None,
        codec: Codec | None = None,
        stop: threading.Event | None = None,
    ):
        self.transport = transport
        self.me = transport.node_id
        self.live_peers = live_peers
        self.timeouts = timeouts or CollectiveTimeouts()
        self.codec = codec or IdentityCodec()
        self.stop = stop
        self._finished_round = -1
        self._lock = threading.Lock()
        transport.on(JOIN, self._on_join)

    # ------------------------------------------------------------ entry point
    def all_reduce(
        self, round: int, tensors: Sequence[torch.Tensor], weight: float = 1.0, state_hash: str = ""
    ) -> RoundResult:
        """Average ``tensors`` (any shapes, any float dtype) over this round's group.

        On "ok" every member returns bit-identical float32 tensors of the input shapes."""
        self.transport.mailbox.prune(round)
        start = time.monotonic()
        peers = [p for p in self.live_peers() if p.round == round and p.id != self.me]
        leader = min([self.me, *(p.id for p in peers)])
        try:
            if leader == self.me:
                result = self._lead(round, tensors, weight, state_hash, peers)
            else:
                endpoint = next(p.endpoint for p in peers if p.id == leader)
                result = self._follow(round, tensors, weight, state_hash, leader, endpoint)
        finally:
            self._finish(round)
        result.timings["total_s"] = time.monotonic() - start
        return result

    # ------------------------------------------------------------------ leader
    def _lead(self, round, tensors, weight, state_hash, peers) -> RoundResult:
        t = self.timeouts
        expected = [p.id for p in peers]
        joins = self.transport.mailbox.take(
            JOIN, round, 0, expected, time.monotonic() + t.matchmaking_s, stop=self.stop
        )
        # nodes the DHT did not show yet may have joined too: take them as well
        for m in self.transport.mailbox.drain(JOIN, round):
            joins.setdefault(m.sender, m)
        members = [Member(self.me, self.transport.endpoint, weight)]
        for sender, m in sorted(joins.items()):
            if m.meta.get("state_hash") != state_hash:
                log.info("round %d: %s has state %s, leader has %s: told to resync",
                         round, sender, m.meta.get("state_hash"), state_hash)
                self._send(m.meta["endpoint"], ROSTER, round, 0, {"status": "resync"})
                continue
            members.append(Member(sender, m.meta["endpoint"], float(m.meta.get("weight", 1.0))))
        if len(members) == 1 and expected:
            return RoundResult("skipped", round, leader=self.me, reason="no peer joined in time")
        roster = sorted(members, key=lambda m: m.id)
        for attempt in range(t.max_attempts):
            if attempt == 0:
                for m in roster:
                    if m.id != self.me:
                        self._send(m.endpoint, ROSTER, round, 0, self._roster_meta("member", roster))
            flat, missing = self._exchange(round, attempt, tensors, roster)
            others = [m for m in roster if m.id != self.me]
            dones = self.transport.mailbox.take(
                DONE, round, attempt, [m.id for m in others], time.monotonic() + t.decision_s,
                stop=self.stop,
            )
            responders = [m for m in roster if m.id == self.me or m.id in dones]
            if not missing and all(d.meta.get("ok") for d in dones.values()):
                for m in responders:
                    if m.id != self.me:
                        self._send(m.endpoint, DECISION, round, attempt, {"decision": "commit"})
                return RoundResult("ok", round, self._unflatten(flat, tensors),
                                   tuple(m.id for m in responders), attempt + 1, self.me,
                                   self.transport.endpoint)
            if attempt + 1 < t.max_attempts:
                log.warning("round %d attempt %d incomplete (missing %s, %d/%d reported): retrying "
                            "with %s", round, attempt, missing, len(dones), len(others),
                            [m.id for m in responders])
                for m in responders:
                    if m.id != self.me:
                        self._send(m.endpoint, DECISION, round, attempt,
                                   self._roster_meta("retry", responders, decision="retry"))
                roster = responders
        for m in roster:
            if m.id != self.me:
                self._send(m.endpoint, DECISION, round, t.max_attempts - 1, {"decision": "abort"})
        return RoundResult("skipped", round, leader=self.me, attempts=t.max_attempts,
                           reason="aborted after retries")

    # ---------------------------------------------------------------- follower
    def _follow(self, round, tensors, weight, state_hash, leader, leader_endpoint) -> RoundResult:
        t = self.timeouts
        skipped = dict(round=round, leader=leader, leader_endpoint=leader_endpoint)
        self._send(leader_endpoint, JOIN, round, 0, {
            "state_hash": state_hash, "weight": weight, "endpoint": self.transport.endpoint,
        })
        reply = self.transport.recv(ROSTER, round, 0, leader, t.join_s, stop=self.stop)
        if reply is None:
            return RoundResult("skipped", reason="no roster from leader", **skipped)
        status = reply.meta.get("status")
        if status in ("resync", "closed"):
            return RoundResult("resync", reason=f"leader says {status}", **skipped)
        roster = self._parse_roster(reply)
        if roster is None:
            return RoundResult("skipped", reason="malformed roster", **skipped)
        for attempt in range(t.max_attempts):
            flat, missing = self._exchange(round, attempt, tensors, roster)
            self._send(leader_endpoint, DONE, round, attempt, {"ok": not missing, "missing": missing})
            decision = self.transport.recv(DECISION, round, attempt, leader,
                                           t.decision_s + t.allreduce_s, stop=self.stop)
            verdict = decision.meta.get("decision") if decision else None
            if verdict == "commit" and not missing:
                return RoundResult("ok", round, self._unflatten(flat, tensors),
                                   tuple(m.id for m in roster), attempt + 1, leader, leader_endpoint)
            if verdict == "retry":
                new = self._parse_roster(decision)
                if new is not None and any(m.id == self.me for m in new):
                    roster = new
                    continue
            reason = "no decision from leader" if decision is None else f"leader decided {verdict}"
            return RoundResult("skipped", attempts=attempt + 1, reason=reason, **skipped)
        return RoundResult("skipped", attempts=t.max_attempts, reason="out of attempts", **skipped)

    # ------------------------------------------------------------- data phase
    def _exchange(self, round, attempt, tensors, roster: list[Member]):
        """Phases 1 and 2. Returns (flat averaged vector or None, owners whose part is missing)."""
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        n = len(roster)
        me = next(i for i, m in enumerate(roster) if m.id == self.me)
        bounds = split_bounds(flat.numel(), n)
        deadline = time.monotonic() + self.timeouts.allreduce_s
        my_weight = roster[me].weight
        # Phase 1: reduce-scatter. Send every other member the part it owns.
        for j, m in enumerate(roster):
            if j != me:
                payload, meta = self.codec.encode(flat[bounds[j]:bounds[j + 1]])
                self._send(m.endpoint, PART, round, attempt, {"part": j, "weight": my_weight,
                                                              "codec": meta}, payload)
        others = [m.id for j, m in enumerate(roster) if j != me]
        parts = self.transport.mailbox.take(PART, round, attempt, others, deadline, stop=self.stop)
        numel = bounds[me + 1] - bounds[me]
        acc = flat[bounds[me]:bounds[me + 1]] * my_weight
        total = my_weight
        for m in roster:  # roster order, not arrival order: the owner's sum is reproducible
            msg = parts.get(m.id)
            if msg is None or m.id == self.me:
                continue
            part = self._decode(msg, me, numel)
            if part is not None:
                w = float(msg.meta.get("weight", 1.0))
                acc.add_(part, alpha=w)
                total += w
        averaged = acc / total
        # Phase 2: all-gather. Send my averaged part to everyone.
        for j, m in enumerate(roster):
            if j != me:
                payload, meta = self.codec.encode(averaged)
                self._send(m.endpoint, AVG, round, attempt, {"part": me, "codec": meta}, payload)
        gathered = self.transport.mailbox.take(AVG, round, attempt, others, deadline, stop=self.stop)
        pieces: list[torch.Tensor] = []
        missing: list[str] = []
        for j, m in enumerate(roster):
            if j == me:
                pieces.append(averaged)
                continue
            msg = gathered.get(m.id)
            piece = None if msg is None else self._decode(msg, j, bounds[j + 1] - bounds[j])
            if piece is None:
                missing.append(m.id)
            else:
                pieces.append(piece)
        if missing:
            return None, missing
        return torch.cat(pieces), []

    def _decode(self, msg: Message, part: int, numel: int) -> torch.Tensor | None:
        if msg.meta.get("part") != part:
            log.warning("%s from %s: part %r, expected %d; ignored", msg.kind, msg.sender,
                        msg.meta.get("part"), part)
            return None
        try:
            t = self.codec.decode(msg.tensors, msg.meta.get("codec", {}), numel)
        except CodecError as exc:
            log.warning("%s from %s rejected: %s", msg.kind, msg.sender, exc)
            return None
        if not torch.isfinite(t).all():
            log.warning("%s from %s holds NaN/Inf; ignored", msg.kind, msg.sender)
            return None
        return t

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out, offset = [], 0
        for t in like:
            out.append(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        return out

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
        with self._lock:
            late = msg.round <= self._finished_round
            if not late:
                self.transport.mailbox.put(msg)
        if late:
            self._send(endpoint, ROSTER, msg.round, 0, {"status": "closed"})

    def _finish(self, round: int) -> None:
        with self._lock:
            self._finished_round = max(self._finished_round, round)
            leftovers = [m for r in range(max(0, round - 1), round + 1)
                         for m in self.transport.mailbox.drain(JOIN, r)]
        for m in leftovers:
            self._send(m.meta["endpoint"], ROSTER, m.round, 0, {"status": "closed"})
