"""Gossip exchange within a small group (NoLoCo): no leader, no collective, no barrier.

Pairing: every node computes ``random_groups(roster, round, size, seed)`` from the round
number and the roster it sees (live peers in the DHT at a nearby round, plus itself):
a seeded shuffle of the sorted ids, cut into groups of ``size``; a short last group is
merged into the one before it (an odd node out makes a group of three). Nodes that see
the same roster agree on the groups without exchanging a message.

One exchange, as a member sees it::

    me --GOSSIP(round, group; my tensors)--> each partner
    wait for each partner's GOSSIP, or its decline, or the deadline

A node whose roster differs (a peer that just joined or died, a DHT view that lags) may
send to someone who did not pick it. That node answers at once: with its own data, taking
the sender into its group for the round (adopted; at most ``max_adopted`` a round), or with
a decline (``GOSSIP`` with ``decline``) when it is past its adoption limit or already done
with the round (finished it, or skipped it by adopting a peer's state). Nobody waits on a
node that waits on another, so differing views cost no stall. A partner that never answers
(it died) costs at most the deadline, less once it leaves the DHT view; the caller then
averages with whoever did answer, or steps alone.

Messages go to the chosen partners and to at most ``max_adopted`` nodes that chose this
one: a node's traffic in a round is O(group size), whatever the swarm size.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .codecs import CodecError, Compressor, Layout
from .flat import flat_of, unflatten
from .messages import GOSSIP
from .transport import Transport
from .wire import Message

log = logging.getLogger(__name__)



def random_groups(ids: Sequence[str], round: int, size: int, seed: int = 0) -> list[list[str]]:
    """Groups of ``size`` from a shuffle seeded by (seed, round); deterministic for a given
    set of ids, whatever their order. A short last group joins the previous one."""
    if size < 2:
        raise ValueError(f"group size must be at least 2, got {size}")
    order = sorted(set(ids))
    random.Random(f"loco-gossip:{seed}:{round}").shuffle(order)
    groups = [order[i:i + size] for i in range(0, len(order), size)]
    if len(groups) > 1 and len(groups[-1]) < size:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


@dataclass
class ExchangeResult:
    """What came back from the partners: their tensors by id, and who declined or was silent."""

    received: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    sent_to: list[str] = field(default_factory=list)
    wait_s: float = 0.0
    adopted: list[str] = field(default_factory=list)  # chose this node without being chosen
    metas: dict[str, dict] = field(default_factory=dict)  # what each partner in ``received`` sent along
    own: list[torch.Tensor] = field(default_factory=list)  # this node's tensors as the partners decode them


@dataclass
class _OpenRound:
    """The round whose exchange is running, as the I/O thread needs it to answer at once."""

    round: int
    partners: dict[str, str]  # chosen by this node: id -> endpoint
    adopted: dict[str, str]  # nodes that chose this one without being chosen: id -> endpoint
    meta: dict
    frames: list[torch.Tensor]


class GroupExchange:
    def __init__(self, transport: Transport, compressor: Compressor | None = None,
                 stop: threading.Event | None = None, live: Callable[[], Iterable[str]] | None = None,
                 max_adopted: int = 2):
        """``live``: ids of the nodes in the DHT view; a partner that leaves it is not waited
        for (without it, a dead partner costs the whole timeout). ``max_adopted``: how many
        nodes that chose this one without being chosen it answers with its data per round
        (past that, they get a decline): what a node sends stays O(group size)."""
        self.transport = transport
        self.live = live
        self.me = transport.node_id
        self.compressor = compressor or Compressor("none")
        self.stop = stop
        self.max_adopted = max_adopted
        self._finished_round = -1
        self._open: _OpenRound | None = None
        self._lock = threading.Lock()
        transport.on(GOSSIP, self._on_gossip)

    def exchange(self, round: int, partners: dict[str, str], tensors: Sequence[torch.Tensor],
                 timeout_s: float, extra: dict | None = None, numel: int | None = None) -> ExchangeResult:
        """Send ``tensors`` to every partner (id -> endpoint) and collect theirs (float32,
        shaped like ``tensors``). Returns after every partner answered or declined, or at
        the deadline. Compressed once for all partners (stream "gossip"). ``extra``: more
        meta for every message (the GOSSIP schema's optional fields); each partner's comes
        back in ``metas``.

        A node that chose this one without being chosen (its view of the roster differs) is
        adopted: answered at once with this node's data, and its data joins the mean, so
        that differing views cost no exchange and nobody waits on a node that waits on
        another (up to ``max_adopted`` a round; more get a decline).

        ``numel`` (with no ``tensors``): a handshake. Nothing but the agreement to average
        travels (the data follows in parts, :mod:`.gossip_parts`); a partner's message must
        state the same ``numel`` (the length of what it will send), and ``received`` holds
        an empty list for each partner that agreed."""
        self.transport.mailbox.prune(round)
        result = ExchangeResult()
        group = sorted([self.me, *partners])
        layout = Layout.of(tensors)
        if numel is None:
            frames, codec_meta, decoded = self.compressor.encode("gossip", flat_of(tensors), 0, layout)
            result.own = unflatten(decoded, tensors)
            meta = {"endpoint": self.transport.endpoint, "group": group, "codec": codec_meta, "numel": layout.total,
                    **(extra or {})}
        else:
            frames = []
            meta = {"endpoint": self.transport.endpoint, "group": group, "numel": numel, **(extra or {})}
        with self._lock:
            opened = self._open = _OpenRound(round, dict(partners), {}, meta, frames)
            early = self.transport.mailbox.drain(GOSSIP, round)  # sent before this node got here
            answers: dict[str, Message] = {}
            refused = []
            for m in early:
                if m.sender in partners or (not m.meta.get("decline") and self._admit(opened, m)):
                    answers.setdefault(m.sender, m)
                else:
                    refused.append(m)
            adopted_early = dict(opened.adopted)
        for m in refused:
            self._decline(m)
        for pid, endpoint in sorted({**partners, **adopted_early}.items()):
            self.transport.name_peer(endpoint, pid)
            self.transport.send(endpoint, Message(GOSSIP, round=round, meta=meta, tensors=frames))
            result.sent_to.append(pid)
        start = time.monotonic()
        deadline = start + timeout_s
        live = self.live if self.live is not None else lambda: partners
        waiting = set(partners) - answers.keys()
        answers.update(self.transport.mailbox.take_from_live(GOSSIP, round, 0, waiting, deadline, live, self.stop))
        with self._lock:
            self._finished_round = max(self._finished_round, round)
            self._open = None
            leftovers = self.transport.mailbox.drain(GOSSIP, round)
            adopted = dict(opened.adopted)
        for m in leftovers:  # the data of nodes adopted meanwhile; anything else is declined
            if m.sender in adopted and m.sender not in answers and not m.meta.get("decline"):
                answers[m.sender] = m
            elif m.sender not in answers:
                self._decline(m)
        result.sent_to += sorted(adopted.keys() - adopted_early.keys())
        for _, msg in sorted(answers.items()):
            if msg.meta.get("decline"):
                if msg.sender in partners:
                    result.declined.append(msg.sender)
                continue
            decoded = self._decode(msg, layout, tensors) if numel is None else self._agreed(msg, numel)
            if decoded is None:
                result.silent.append(msg.sender)  # unusable: treated like no answer
            else:
                result.received[msg.sender] = decoded
                result.metas[msg.sender] = dict(msg.meta)
        result.silent += sorted(set(partners) - answers.keys())
        result.adopted = sorted(adopted)
        result.wait_s = time.monotonic() - start
        if result.received:  # a partner used what we sent: keep the error feedback's remainder
            self.compressor.commit()
        else:
            self.compressor.discard()
        return result

    def skip_to(self, round: int) -> None:
        """This node adopted a peer's state and runs no exchange before ``round``: data for
        an earlier round is declined at once, so nobody waits on it."""
        with self._lock:
            self._finished_round = max(self._finished_round, round - 1)
            leftovers = self.transport.mailbox.drain_before(GOSSIP, round)
        for m in leftovers:
            self._decline(m)

    def _decode(self, msg: Message, layout: Layout, like: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        if msg.meta.get("numel") != layout.total:
            log.warning("GOSSIP from %s: %r elements, expected %d; ignored", msg.sender, msg.meta.get("numel"),
                        layout.total)
            return None
        try:
            flat = self.compressor.decode(msg.tensors, msg.meta.get("codec"), 0, layout.total, layout)
        except CodecError as exc:
            log.warning("GOSSIP from %s rejected: %s", msg.sender, exc)
            return None
        if not torch.isfinite(flat.sum()):
            log.warning("GOSSIP from %s holds NaN/Inf; ignored", msg.sender)
            return None
        # received tensors are views over zmq frames: clone so they outlive the message
        return unflatten(flat.clone(), like)

    @staticmethod
    def _agreed(msg: Message, numel: int) -> list[torch.Tensor] | None:
        """A handshake's answer: [] where it agrees to average ``numel`` values, None otherwise."""
        if msg.meta.get("numel") != numel or msg.tensors:
            log.warning("GOSSIP handshake from %s: %r elements and %d tensors, expected %d and none; ignored",
                        msg.sender, msg.meta.get("numel"), len(msg.tensors), numel)
            return None
        return []

    def _decline(self, msg: Message) -> None:
        endpoint = msg.meta.get("endpoint")
        if isinstance(endpoint, str) and not msg.meta.get("decline"):
            self.transport.send(endpoint, Message(GOSSIP, round=msg.round, meta={"decline": True}))

    def _admit(self, opened: _OpenRound, msg: Message) -> bool:
        """Caller holds the lock: adopt ``msg``'s sender into the open round, unless this
        node already adopted ``max_adopted`` others. True: adopted (now or before)."""
        if msg.sender in opened.adopted:
            return True
        endpoint = msg.meta.get("endpoint")
        if not isinstance(endpoint, str) or len(opened.adopted) >= self.max_adopted:
            return False
        opened.adopted[msg.sender] = endpoint
        return True

    def _on_gossip(self, msg: Message) -> None:
        """I/O thread: data for a round this node has finished is declined at once; data for
        the round it is exchanging, from a node it did not choose, is answered at once
        (adopted) or declined; anything else waits in the mailbox for the exchange."""
        answer = None
        with self._lock:
            opened = self._open
            late = msg.round <= self._finished_round
            if late:
                pass
            elif (opened is not None and msg.round == opened.round and msg.sender not in opened.partners
                  and not msg.meta.get("decline")):
                known = msg.sender in opened.adopted
                late = not self._admit(opened, msg)
                if not late:
                    self.transport.file(msg)
                    answer = None if known else opened
            else:
                self.transport.file(msg)
        if late:
            self._decline(msg)
        elif answer is not None:
            endpoint = answer.adopted[msg.sender]
            self.transport.name_peer(endpoint, msg.sender)
            self.transport.send(endpoint, Message(GOSSIP, round=answer.round, meta=answer.meta, tensors=answer.frames))
