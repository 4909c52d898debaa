"""Phases 1 and 2 of a group all-reduce round (see :mod:`.collective`): reduce-scatter,
each member averaging the part of the flat vector it owns, then all-gather of the
averaged parts, chunk by chunk, with outlier and NaN checks on what arrives."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .codecs import CodecError, Compressor, Layout
from .flat import flat_of
from .membership import PeerInfo
from .messages import AVG, PART
from .regions import RoundLayout, Segment
from .transport import ABSENCE_CHECK_S, AbsenceWatch, Transport
from .wire import Message

log = logging.getLogger(__name__)

MIN_JUDGED_NUMEL = 64  # norms of fewer values are too noisy to call one an outlier
MAX_SPAN_CREDIT = 64  # a contribution is allowed at most this many periods' worth of norm


@dataclass(frozen=True)
class Member:
    id: str
    endpoint: str
    weight: float = 1.0
    ranks: tuple[str, ...] = ()  # a member of several processes: each rank's endpoint (rank 0's first)

    @property
    def size(self) -> int:
        return max(1, len(self.ranks))

    def at(self, rank: int) -> str:
        """The endpoint of this member's rank ``rank``."""
        return self.ranks[rank] if self.ranks else self.endpoint


@dataclass(frozen=True)
class Region:
    """What one rank of a member of several brings to a round: its ``tensors`` hold
    ``[lo, lo + their numel)`` of a ``layout.total``-long vector laid out as ``layout``
    (codecs work per layer of the whole vector), and this process is rank ``rank``."""

    rank: int
    layout: Layout


class DataPhase:
    """One member's side of the data phases, reusing its output buffer across rounds."""

    def __init__(self, transport: Transport, compressor: Compressor, live_peers: Callable[[], list[PeerInfo]],
                 allreduce_s: float, stop: threading.Event | None, chunk_bytes: int,
                 max_norm_ratio: float):
        self.transport = transport
        self.me = transport.node_id
        self.compressor = compressor
        self.live_peers = live_peers
        self.allreduce_s = allreduce_s
        self.stop = stop
        self.chunk_bytes = chunk_bytes
        self.max_norm_ratio = max_norm_ratio
        self.check_s = ABSENCE_CHECK_S  # how often a wait on parts looks at the DHT for members that left
        self.suspects: set[str] = set()
        self.span = 1  # the round at hand's (see begin)
        self.sessions: dict[str, str] = {}
        self._out: torch.Tensor | None = None

    def begin(self, span: int, sessions: dict[str, str]) -> None:
        """A new round: this node's input covers ``span`` sync periods (see ``_outliers``);
        ``sessions``: its peers' sessions at the round's start (a member whose record later
        shows another one died and came back: see AbsenceWatch)."""
        self.span = max(1, int(span))
        self.sessions = sessions
        self.suspects = set()

    def _output(self, numel: int) -> torch.Tensor:
        """The result buffer, reused across rounds: allocating (and page-faulting) a fresh
        model-sized buffer every round costs more than the arithmetic."""
        if self._out is None or self._out.numel() != numel:
            self._out = torch.empty(numel, dtype=torch.float32)
        return self._out

    def exchange(self, round, attempt, tensors, roster: list[Member], region: Region | None = None,
                 norm: float | None = None):
        """Phases 1 and 2. Returns (flat averaged vector or None, owners whose part is missing);
        ``suspects`` then holds the members whose contribution was an outlier or held NaN/Inf.
        ``region``: this process is one rank of a member of several, and ``tensors`` hold
        that rank's region of the vector (:mod:`.regions`); the result is that region, averaged.
        ``norm``: the L2 norm of this member's whole contribution (given with ``region``,
        whose tensors are only part of it; computed here otherwise). It travels with every
        part, and the outlier rule judges members by it (see ``_outliers``).

        Values travel in segments of at most ``chunk_bytes`` (:class:`.regions.RoundLayout`):
        the owner adds segment c while segment c+1 is on the wire, and ZeroMQ's receive
        buffers stay small enough for the allocator to reuse them (one 100 MB message per
        round costs fresh pages every time). Segments go out zero-copy, as views of ``flat``
        and of the output buffer; neither is written again before every member has reported
        the round done (or was dropped)."""
        flat = flat_of(tensors)
        layout = region.layout if region is not None else Layout.of(tensors)
        rank = region.rank if region is not None else 0
        me = next(i for i, m in enumerate(roster) if m.id == self.me)
        plan = RoundLayout(layout.total, [m.size for m in roster], self._chunk_numel)
        base, end = plan.region(me, rank)
        if end - base != flat.numel():
            raise ValueError(f"rank {rank} of {roster[me].size} brings {flat.numel()} values; its region of the "
                             f"{layout.total}-long vector is [{base}, {end})")
        deadline = time.monotonic() + self.allreduce_s
        my_weight = roster[me].weight
        held = plan.held_by(me, rank)
        # Phase 1: reduce-scatter. Every segment of my region goes to the rank that averages
        # it, interleaved across owners so that all of them can start adding at once.
        judged = self.max_norm_ratio > 0 and layout.total >= MIN_JUDGED_NUMEL
        if norm is None:
            norm = float(torch.linalg.vector_norm(flat)) if judged else 0.0
        if not math.isfinite(norm):  # NaN/Inf in it: as large as a norm gets (the wire takes finite numbers)
            norm = sys.float_info.max
        self._send_parts(round, attempt, flat, base, held, roster, me, layout,
                         {"weight": my_weight, "span": self.span, "norm": norm})
        out = self._output(flat.numel())
        failed: set[str] = set()  # members whose part did not arrive intact
        suspects: set[str] = set()  # members whose contribution is an outlier (self included)
        # a member that dies mid-round is not waited for past its DHT record's expiry
        watch = AbsenceWatch(lambda: [(p.id, p.session) for p in self.live_peers()], self.sessions)
        owned = plan.owned_by(me, rank)
        for seg in owned:
            lo, hi = seg.lo - base, seg.hi - base
            own = flat[lo:hi]
            got: list[tuple[str, torch.Tensor, float, int, float]] = []
            for m in roster:  # roster order, not arrival order: the owner's sum is reproducible
                if m.id == self.me or m.id in failed:
                    continue
                msg, _ = self.transport.mailbox.take_first_from_live(
                    PART, round, attempt, lambda x, s=m.id, c=seg.lo: x.sender == s and x.meta.get("offset") == c,
                    deadline, lambda s=m.id: {s}, watch, stop=self.stop, check_s=self.check_s)
                part = None if msg is None else self._decode(msg, me, seg.lo, seg.hi - seg.lo, layout)
                claim = None if part is None else self._claimed_norm(msg)
                if claim is None:
                    failed.add(m.id)
                    continue
                if judged:  # a segment cannot be longer than the whole: a sender's claim is no hiding place
                    claim = max(claim, float(torch.linalg.vector_norm(part)))
                got.append((m.id, part, float(msg.meta.get("weight", 1.0)), int(msg.meta.get("span", 1)), claim))
            contributions = [(self.me, my_weight, self.span, norm), *((s, w, sp, n) for s, _, w, sp, n in got)]
            outliers = self._outliers(contributions) if judged else set()
            if outliers:
                norms = {s: f"{n:.4g}" for s, _, _, n in contributions}
                log.warning("round %d: contributions of %s are outliers (norm > %g x the group's median; norms %s); "
                            "excluded", round, sorted(outliers), self.max_norm_ratio, norms)
                suspects |= outliers
                failed |= outliers - {self.me}
            target = out[lo:hi]
            if my_weight == 1.0:
                target.copy_(own)
            else:
                torch.mul(own, my_weight, out=target)
            total = my_weight
            for sender, part, w, _, _ in got:
                if sender in outliers:
                    continue
                target.add_(part, alpha=w)
                total += w  # per segment: a member that died mid-send counts where it arrived
            if total > 0:
                target.div_(total)
            else:  # only zero-weight contributions (a replica that just restored itself)
                target.copy_(own)
        self.suspects |= suspects
        # Phase 2: all-gather. My averaged segments go to every member's rank that holds
        # them; theirs land in `out`. A member that failed phase 1 is not waited for again
        # (it is most likely dead); the others get a fresh deadline, since they may have
        # waited for it too.
        self._send_average(round, attempt, out, base, owned, roster, me, layout)
        deadline = time.monotonic() + self.allreduce_s
        coming = {(roster[s.owner].id, s.lo): s for s in held
                  if s.owner != me and roster[s.owner].id not in failed}
        expected = set(coming)
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
            seg = coming[(msg.sender, msg.meta["offset"])]
            piece = self._decode(msg, seg.owner, seg.lo, seg.hi - seg.lo, layout)
            if piece is None:  # a bad segment spoils its owner's whole part
                failed.add(msg.sender)
                expected = {(s, c) for s, c in expected if s != msg.sender}
                continue
            out[seg.lo - base:seg.hi - base].copy_(piece)
            expected.discard((msg.sender, seg.lo))
        # an outlier of my own: report myself, so that the group goes on without my values
        missing = sorted(failed | {sender for sender, _ in expected} | (suspects & {self.me}))
        if missing:
            return None, missing
        return out, []

    def _outliers(self, contributions: list[tuple[str, float, int, float]]) -> set[str]:
        """Senders (of ``(sender, weight, span, norm)``) whose whole contribution's norm
        exceeds ``max_norm_ratio`` times the group's (lower) median norm, times its span.
        With two members that is the larger one, if it is that much larger: no honest pair
        of replicas differs so much, and one of them is then left out rather than both
        averaging poison. Zero-weight contributions (a replica that just restored itself)
        count for nothing and are not judged.

        Whole contributions, not the segment at hand: one step's gradients of a small part
        of a model differ by more than 10x between honest replicas now and then (attention
        weights on one unusual batch), while their whole vectors stay within a few x. A
        sender's norm is what it claims, or its segment's norm where that is larger, and
        every owner judges the same claims, so the owners agree on who is left out.

        The span (sync periods the contribution covers, as its sender says, at most
        ``MAX_SPAN_CREDIT``): a replica whose last syncs found no group offers all the
        change since its last applied one. Judged as one period's, it was excluded as
        poison at every sync for good, and never averaged with the others again."""
        norms = [(sender, n, min(max(span, 1), MAX_SPAN_CREDIT)) for sender, w, span, n in contributions if w > 0]
        if len(norms) < 2:
            return set()
        values = sorted(n for _, n, _ in norms)
        median = values[(len(values) - 1) // 2]
        if median == 0:  # e.g. rows of an embedding only some replicas' batches touched
            return set()
        return {sender for sender, n, span in norms if n > self.max_norm_ratio * median * span}

    @staticmethod
    def _claimed_norm(msg: Message) -> float | None:
        """The whole-contribution norm a part's sender states; None (the part is refused)
        when it is missing or not a finite non-negative number."""
        claim = msg.meta.get("norm")
        if isinstance(claim, bool) or not isinstance(claim, int | float) or not math.isfinite(claim) or claim < 0:
            log.warning("%s from %s: norm %r is not a finite non-negative number; ignored", msg.kind, msg.sender, claim)
            return None
        return float(claim)

    @property
    def _chunk_numel(self) -> int:
        return max(1, self.chunk_bytes // 4)

    def _send_parts(self, round, attempt, flat, base, held: list[Segment], roster, me, layout, extra):
        """Phase 1: each segment of my region (it starts at ``base``) that another member
        averages, to that member's owning rank, interleaved across owners so that all of
        them can start adding at once. Compressed on the way (stream "part": this process's
        own contribution, with its own error feedback)."""
        by_owner: dict[int, list[Segment]] = {}
        for seg in held:
            if seg.owner != me:
                by_owner.setdefault(seg.owner, []).append(seg)
        queues = list(by_owner.values())
        for c in range(max((len(q) for q in queues), default=0)):
            for queue in queues:
                if c >= len(queue):
                    continue
                seg = queue[c]
                payload, meta, _ = self.compressor.encode("part", flat[seg.lo - base:seg.hi - base], seg.lo, layout)
                self._send(roster[seg.owner].at(seg.holders[seg.owner]), PART, round, attempt,
                           {"part": seg.owner, "offset": seg.lo, "codec": meta, **extra}, payload)

    def _send_average(self, round, attempt, out, base, owned: list[Segment], roster, me, layout):
        """Phase 2: my averaged segments to every other member's rank that holds them. Each
        is encoded once (stream "avg") and this process keeps exactly what the others will
        decode, so that every member ends with the same bits whatever the codec."""
        for seg in owned:
            view = out[seg.lo - base:seg.hi - base]
            payload, meta, decoded = self.compressor.encode("avg", view, seg.lo, layout)
            if self.compressor.lossy:
                payload = [t.clone() for t in payload]  # they must not alias `view`, rewritten next
                view.copy_(decoded)
            for j, m in enumerate(roster):
                if j != me:
                    self._send(m.at(seg.holders[j]), AVG, round, attempt,
                               {"part": me, "offset": seg.lo, "codec": meta}, payload)

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
            self.suspects.add(msg.sender)
            return None
        return t

    def _send(self, endpoint: str, kind: str, round: int, attempt: int, meta: dict,
              tensors: list[torch.Tensor]) -> None:
        self.transport.send(endpoint, Message(kind, round=round, attempt=attempt, meta=meta, tensors=tensors))
