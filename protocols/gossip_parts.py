"""The data of a gossip round, rank to rank: once members' leaders agreed to average together
(the handshake, :class:`.gossip.GroupExchange` with no tensors), every rank of a member sends
the stretches of its own region to the ranks of each partner that hold them, and collects
theirs for its own region.

A member of ``k`` ranks holds its vector in ``k`` regions (``regions.split_bounds``: the layout
depends only on the length and ``k``), so members of any rank counts meet in global
coordinates: a rank cuts its region at every boundary of its partners' regions, and each
piece goes, as one message, to the one rank of each partner whose region holds it. The
vector is made of *sections* of equal length (NoLoCo's: the slow weights φ and θ − φ), and a
rank's region is the same stretch of each; one message carries the piece of every section.
Each piece is encoded once, whatever the number of partners (a stream per section,
"gossip0", "gossip1", ..., with error feedback: each stream's remainders then span this
rank's region only), so a position's remainder is staged once per round.

A rank answers a piece from a member it does not average with this round (its leader did not
agree with that member, or skipped the round) with a decline: the sender's rank stops waiting
for that member at once. A late piece, from a partner of a round this rank already finished,
is dropped without an answer: another rank of this member may still be sending its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .codecs import CodecError, Compressor, Layout
from .messages import GOSSIP_PART
from .regions import split_bounds
from .transport import ABSENCE_CHECK_S, AbsenceWatch, Transport
from .wire import Message

log = logging.getLogger(__name__)

PAST_ROUNDS_KEPT = 8  # rounds whose partners a rank remembers, to tell a late piece from an unwanted one


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> float:
    """Σ x² over ``tensors`` (a share of a whole vector's squared norm), without a copy."""
    return sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors)


@dataclass
class PartsResult:
    """What one rank collected: each partner's values over this rank's region (one flat
    tensor per section), and the partners it gave up on."""

    received: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)  # incomplete at the deadline, left, or sent something unusable
    wait_s: float = 0.0

    def squares(self) -> dict[str, float]:
        """Per partner: the sum of squares of what arrived (a share of its whole norm)."""
        return {pid: sum_of_squares(ts) for pid, ts in self.received.items()}


class PartExchange:
    """One rank's side: its own transport, compressor and open round."""

    def __init__(self, transport: Transport, compressor: Compressor | None = None,
                 stop: threading.Event | None = None):
        self.transport = transport
        self.compressor = compressor or Compressor("none")
        self.stop = stop
        self._lock = threading.Lock()
        self._open: tuple[int, frozenset[str]] | None = None
        self._past: dict[int, frozenset[str]] = {}  # round -> the partners of a finished round
        self._finished = -1
        self._declined: set[tuple[int, str]] = set()  # (round, endpoint) already told
        transport.on(GOSSIP_PART, self._on_part)

    def exchange(self, round: int, sections: Sequence[torch.Tensor], lo: int, layout: Layout,
                 partners: dict[str, list[str]], deadline: float,
                 live: Callable[[], Iterable[str]] | None = None, check_s: float = ABSENCE_CHECK_S) -> PartsResult:
        """Send this rank's region ``[lo, lo + n)`` of every section (``sections``: flat
        float32 tensors of ``n`` values each, the same stretch of each ``layout.total``-long
        section) to the ranks of every partner (id -> its ranks' endpoints in rank order),
        and collect theirs until every partner's region arrived whole, declined or left
        ``live()`` (read every ``check_s``), or ``deadline`` (time.monotonic()) passed."""
        n = sections[0].numel()
        hi, numel, k = lo + n, layout.total, len(sections)
        if any(s.numel() != n for s in sections):
            raise ValueError(f"every section's region must hold {n} values, got {[s.numel() for s in sections]}")
        whole = Layout(layout.shapes * k)  # the codecs' view: the sections end to end
        with self._lock:
            self._open = (round, frozenset(partners))
            early = self.transport.mailbox.drain(GOSSIP_PART, round) + \
                self.transport.mailbox.drain_before(GOSSIP_PART, round)
        for m in early:  # sent before this rank got here: kept if a partner's, else refused
            if m.round == round and (m.sender in partners or m.meta.get("decline")):
                self.transport.file(m)
            elif m.sender not in self._past.get(m.round, frozenset()):  # (else late: dropped)
                self._refuse(m)
        t0 = time.monotonic()
        self._send(round, sections, lo, hi, numel, whole, partners)
        result = self._collect(round, lo, hi, numel, k, whole, partners, deadline, live, check_s)
        result.wait_s = time.monotonic() - t0
        with self._lock:
            self._finished = max(self._finished, round)
            self._open = None
            self._past[round] = frozenset(partners)
            for old in sorted(self._past)[:-PAST_ROUNDS_KEPT]:
                del self._past[old]
            self._declined = {d for d in self._declined if d[0] >= round - PAST_ROUNDS_KEPT}
            leftovers = self.transport.mailbox.drain(GOSSIP_PART, round)
        for m in leftovers:
            if m.sender not in partners:
                self._refuse(m)
        return result

    def skip_to(self, round: int) -> None:
        """This member adopted a peer's state and runs no gossip before ``round``: a piece
        for an earlier round gets a decline."""
        with self._lock:
            self._finished = max(self._finished, round - 1)
            leftovers = self.transport.mailbox.drain_before(GOSSIP_PART, round)
        for m in leftovers:
            self._refuse(m)

    # ------------------------------------------------------------------ sending
    def _send(self, round: int, sections: Sequence[torch.Tensor], lo: int, hi: int, numel: int,
              whole: Layout, partners: dict[str, list[str]]) -> None:
        bounds = {pid: split_bounds(numel, len(ranks)) for pid, ranks in partners.items()}
        cuts = sorted({lo, hi, *(b for bs in bounds.values() for b in bs if lo < b < hi)})
        for a, b in zip(cuts, cuts[1:], strict=False):
            frames, codecs, counts = [], [], []
            for j, s in enumerate(sections):
                wire, meta, _ = self.compressor.encode(f"gossip{j}", s[a - lo:b - lo], j * numel + a, whole)
                frames += wire
                codecs.append(meta)
                counts.append(len(wire))
            meta = {"endpoint": self.transport.endpoint, "lo": a, "hi": b, "numel": numel, "codecs": codecs,
                    "frames": counts}
            for pid, ranks in sorted(partners.items()):
                holder = next(r for r in range(len(ranks)) if bounds[pid][r] <= a < bounds[pid][r + 1])
                self.transport.name_peer(ranks[holder], pid)
                self.transport.send(ranks[holder], Message(GOSSIP_PART, round=round, meta=meta, tensors=frames))

    # ---------------------------------------------------------------- receiving
    def _collect(self, round: int, lo: int, hi: int, numel: int, k: int, whole: Layout,
                 partners: dict[str, list[str]], deadline: float, live: Callable[[], Iterable[str]] | None,
                 check_s: float) -> PartsResult:
        result = PartsResult()
        buffers = {pid: [torch.empty(hi - lo, dtype=torch.float32) for _ in range(k)] for pid in partners}
        got: dict[str, list[tuple[int, int]]] = {pid: [] for pid in partners}
        waiting = set(partners) if hi > lo else set()
        watch = AbsenceWatch(live if live is not None else lambda: partners)
        while waiting:
            msg, gone = self.transport.mailbox.take_first_from_live(
                GOSSIP_PART, round, 0, lambda m, w=waiting: m.sender in w, deadline, lambda w=waiting: set(w), watch,
                stop=self.stop, check_s=check_s)
            if gone:
                waiting -= gone
                result.silent += sorted(gone)
                continue
            if msg is None:  # the deadline, or stopping
                break
            pid = msg.sender
            if msg.meta.get("decline"):
                waiting.discard(pid)
                result.declined.append(pid)
                continue
            piece = self._decode(msg, lo, hi, numel, k, whole, got[pid])
            if piece is None:  # unusable: the partner is left out, as if it never answered
                waiting.discard(pid)
                result.silent.append(pid)
                continue
            a, b, values = piece
            for buf, v in zip(buffers[pid], values, strict=True):
                buf[a - lo:b - lo].copy_(v)
            got[pid].append((a, b))
            if sum(y - x for x, y in got[pid]) == hi - lo:
                waiting.discard(pid)
                result.received[pid] = buffers[pid]
        result.silent += sorted(waiting)
        if hi == lo:  # an empty region: nothing to collect from anyone
            result.received = {pid: buffers[pid] for pid in partners}
        return result

    def _decode(self, msg: Message, lo: int, hi: int, numel: int, k: int, whole: Layout,
                seen: list[tuple[int, int]]) -> tuple[int, int, list[torch.Tensor]] | None:
        meta = msg.meta
        a, b = meta.get("lo"), meta.get("hi")
        codecs, counts = meta.get("codecs"), meta.get("frames")
        if meta.get("numel") != numel or a is None or b is None or not lo <= a < b <= hi:
            log.warning("GOSSIP_PART from %s: [%r, %r) of %r values does not lie in this rank's region [%d, %d) "
                        "of %d; ignored", msg.sender, a, b, meta.get("numel"), lo, hi, numel)
            return None
        if any(x < b and a < y for x, y in seen):
            log.warning("GOSSIP_PART from %s: [%d, %d) overlaps a stretch it sent already; ignored", msg.sender, a, b)
            return None
        if not isinstance(codecs, list) or not isinstance(counts, list) or len(codecs) != k or len(counts) != k \
                or sum(counts) != len(msg.tensors):
            log.warning("GOSSIP_PART from %s: %r sections in %d frames, expected %d; ignored", msg.sender,
                        counts, len(msg.tensors), k)
            return None
        values, start = [], 0
        try:
            for j, (codec, count) in enumerate(zip(codecs, counts, strict=True)):
                v = self.compressor.decode(msg.tensors[start:start + count], codec, j * numel + a, b - a, whole)
                start += count
                if not torch.isfinite(v.sum()):
                    log.warning("GOSSIP_PART from %s holds NaN/Inf; ignored", msg.sender)
                    return None
                values.append(v)
        except CodecError as exc:
            log.warning("GOSSIP_PART from %s rejected: %s", msg.sender, exc)
            return None
        return a, b, values

    # ------------------------------------------------------------------ I/O thread
    def _on_part(self, msg: Message) -> None:
        """A piece for the open round from a partner, or for a round to come, waits in the
        mailbox; one from a member this rank does not average with gets a decline; a late one
        from a partner of a finished round is dropped."""
        refuse = False
        with self._lock:
            if msg.meta.get("decline"):
                if self._open is not None and msg.round == self._open[0] or msg.round > self._finished:
                    self.transport.file(msg)
                return
            if self._open is not None and msg.round == self._open[0]:
                refuse = msg.sender not in self._open[1]
                if not refuse:
                    self.transport.file(msg)
            elif msg.round <= self._finished:
                refuse = msg.sender not in self._past.get(msg.round, frozenset())
            else:
                self.transport.file(msg)
        if refuse:
            self._refuse(msg)

    def _refuse(self, msg: Message) -> None:
        endpoint = msg.meta.get("endpoint")
        if msg.meta.get("decline") or not isinstance(endpoint, str):
            return
        with self._lock:
            if (msg.round, endpoint) in self._declined:
                return
            self._declined.add((msg.round, endpoint))
        self.transport.send(endpoint, Message(GOSSIP_PART, round=msg.round,
                                              meta={"endpoint": self.transport.endpoint, "decline": True}))
