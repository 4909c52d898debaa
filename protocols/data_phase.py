"""Phases 1 and 2 of a group all-reduce round (see :mod:`.collective`): reduce-scatter,
each member averaging the part of the flat vector it owns, then all-gather of the
averaged parts, chunk by chunk, with outlier and NaN checks on what arrives."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .codecs import CodecError, Compressor, Layout
from .flat import flat_of
from .membership import PeerInfo
from .messages import AVG, PART
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


def split_bounds(numel: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal contiguous slices of a ``numel`` vector."""
    base, extra = divmod(numel, parts)
    bounds = [0]
    for j in range(parts):
        bounds.append(bounds[-1] + base + (1 if j < extra else 0))
    return bounds


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

    def exchange(self, round, attempt, tensors, roster: list[Member]):
        """Phases 1 and 2. Returns (flat averaged vector or None, owners whose part is missing);
        ``suspects`` then holds the members whose contribution was an outlier or held NaN/Inf.

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
        deadline = time.monotonic() + self.allreduce_s
        my_weight = roster[me].weight
        # Phase 1: reduce-scatter. Every other member gets the part it owns, chunk by chunk,
        # interleaved across members so that all owners can start adding at once.
        self._send_parts(round, attempt, flat, bounds, roster, me, layout, {"weight": my_weight, "span": self.span})
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
        watch = AbsenceWatch(lambda: [(p.id, p.session) for p in self.live_peers()], self.sessions)
        for lo, hi in self._chunks(mine.numel()):
            got: list[tuple[str, torch.Tensor, float, int]] = []
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
                got.append((m.id, part, float(msg.meta.get("weight", 1.0)), int(msg.meta.get("span", 1))))
            outliers = self._outliers([(self.me, own[lo:hi], my_weight, self.span), *got])
            if outliers:
                log.warning("round %d: contributions of %s are outliers (norm > %g x the group's median); "
                            "excluded", round, sorted(outliers), self.max_norm_ratio)
                suspects |= outliers
                failed |= outliers - {self.me}
            total = my_weight
            for sender, part, w, _ in got:
                if sender in outliers:
                    continue
                mine[lo:hi].add_(part, alpha=w)
                total += w  # per chunk: a member that died mid-send counts where it arrived
            if total > 0:
                mine[lo:hi].div_(total)
            else:  # only zero-weight contributions (a replica that just restored itself)
                mine[lo:hi].copy_(own[lo:hi])
        self.suspects |= suspects
        # Phase 2: all-gather. My averaged part goes to everyone; theirs land in `out`.
        # A member that failed phase 1 is not waited for again (it is most likely dead);
        # the others get a fresh deadline, since they may have waited for it too.
        self._send_average(round, attempt, out, bounds, roster, me, layout)
        deadline = time.monotonic() + self.allreduce_s
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

    def _outliers(self, contributions: list[tuple[str, torch.Tensor, float, int]]) -> set[str]:
        """Senders whose contribution's norm exceeds ``max_norm_ratio`` times the group's
        (lower) median norm, times its span. With two members that is the larger one, if it
        is that much larger: no honest pair of replicas differs so much, and one of them is
        then left out rather than both averaging poison. Zero-weight contributions (a
        replica that just restored itself) count for nothing and are not judged.

        The span (sync periods the contribution covers, as its sender says, at most
        ``MAX_SPAN_CREDIT``): a replica whose last syncs found no group offers all the
        change since its last applied one. Judged as one period's, it was excluded as
        poison at every sync for good, and never averaged with the others again."""
        if self.max_norm_ratio <= 0 or contributions[0][1].numel() < MIN_JUDGED_NUMEL:
            return set()
        norms = [(sender, float(torch.linalg.vector_norm(t)), min(max(span, 1), MAX_SPAN_CREDIT))
                 for sender, t, w, span in contributions if w > 0]
        if len(norms) < 2:
            return set()
        values = sorted(n for _, n, _ in norms)
        median = values[(len(values) - 1) // 2]
        if median == 0:  # e.g. rows of an embedding only some replicas' batches touched
            return set()
        return {sender for sender, n, span in norms if n > self.max_norm_ratio * median * span}

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
            self.suspects.add(msg.sender)
            return None
        return t

    def _send(self, endpoint: str, kind: str, round: int, attempt: int, meta: dict,
              tensors: list[torch.Tensor]) -> None:
        self.transport.send(endpoint, Message(kind, round=round, attempt=attempt, meta=meta, tensors=tensors))
