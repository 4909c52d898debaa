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
send to someone who did not pick it. That node declines at once (``GOSSIP`` with
``decline``: when its own exchange for the round ends, or immediately if the round is
already over here), so the sender does not wait out the deadline for nothing. A partner
that never answers costs at most the deadline; the caller then averages with whoever
did answer, or steps alone.

Messages go only to the chosen partners: a node's traffic in a round is O(group size),
whatever the swarm size.
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


class GroupExchange:
    def __init__(self, transport: Transport, compressor: Compressor | None = None,
                 stop: threading.Event | None = None, live: Callable[[], Iterable[str]] | None = None):
        """``live``: ids of the nodes in the DHT view; a partner that leaves it is not waited
        for (without it, a dead partner costs the whole timeout)."""
        self.transport = transport
        self.live = live
        self.me = transport.node_id
        self.compressor = compressor or Compressor("none")
        self.stop = stop
        self._finished_round = -1
        self._lock = threading.Lock()
        transport.on(GOSSIP, self._on_gossip)

    def exchange(self, round: int, partners: dict[str, str], tensors: Sequence[torch.Tensor],
                 timeout_s: float) -> ExchangeResult:
        """Send ``tensors`` to every partner (id -> endpoint) and collect theirs (float32,
        shaped like ``tensors``). Returns after every partner answered or declined, or at
        the deadline. Compressed once for all partners (stream "gossip")."""
        self.transport.mailbox.prune(round)
        result = ExchangeResult()
        group = sorted([self.me, *partners])
        layout = Layout.of(tensors)
        frames, codec_meta, _ = self.compressor.encode("gossip", flat_of(tensors), 0, layout)
        for pid, endpoint in sorted(partners.items()):
            self.transport.name_peer(endpoint, pid)
            self.transport.send(endpoint, Message(GOSSIP, round=round, meta={
                "endpoint": self.transport.endpoint, "group": group, "codec": codec_meta,
                "numel": layout.total}, tensors=frames))
            result.sent_to.append(pid)
        start = time.monotonic()
        deadline = start + timeout_s
        live = self.live if self.live is not None else lambda: partners
        answers = self.transport.mailbox.take_from_live(GOSSIP, round, 0, partners, deadline, live, self.stop)
        waiting = set(partners) - answers.keys()
        for _, msg in sorted(answers.items()):
            if msg.meta.get("decline"):
                result.declined.append(msg.sender)
                continue
            decoded = self._decode(msg, layout, tensors)
            if decoded is None:
                result.silent.append(msg.sender)  # unusable: treated like no answer
            else:
                result.received[msg.sender] = decoded
        result.silent += sorted(waiting)
        result.wait_s = time.monotonic() - start
        if result.received:  # a partner used what we sent: keep the error feedback's remainder
            self.compressor.commit()
        else:
            self.compressor.discard()
        self._finish(round)
        return result

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

    def _decline(self, msg: Message) -> None:
        endpoint = msg.meta.get("endpoint")
        if isinstance(endpoint, str) and not msg.meta.get("decline"):
            self.transport.send(endpoint, Message(GOSSIP, round=msg.round, meta={"decline": True}))

    def _on_gossip(self, msg: Message) -> None:
        """I/O thread: data for a round this node has finished is declined at once."""
        with self._lock:
            late = msg.round <= self._finished_round
            if not late:
                self.transport.file(msg)
        if late:
            self._decline(msg)

    def _finish(self, round: int) -> None:
        """Whoever sent data this round without being waited for gets a decline."""
        with self._lock:
            self._finished_round = max(self._finished_round, round)
            leftovers = self.transport.mailbox.drain(GOSSIP, round)
        for m in leftovers:
            self._decline(m)
