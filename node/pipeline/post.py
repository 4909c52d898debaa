"""How a pipeline node sends and drops messages: by node name (the transport's per-link
shaping and counts go by name), to itself through its own channel (a leader's plan), and a
malformed message dropped and counted, never taking the node down."""

from __future__ import annotations

import logging
from typing import Any

import torch

from loco.protocols.membership import PeerInfo
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import Iteration
from loco.protocols.transport import Transport
from loco.protocols.wire import Message

log = logging.getLogger("loco.node.pipeline")


class Post:
    def __init__(self, transport: Transport, channel: Channel, me: str, wire: torch.dtype = torch.float32):
        """``wire``: the dtype activations and their gradients travel in (``pipeline.wire_dtype``)."""
        self.transport, self.channel, self.me, self.wire = transport, channel, me, wire

    def send(self, node: str, endpoint: str, msg: Message) -> None:
        self.transport.name_peer(endpoint, node)
        self.transport.send(endpoint, msg)

    def send_task(self, work: Iteration, node: str, kind: str, m: int, hop: int, is_eval: bool,
                  tensor: torch.Tensor) -> None:
        """A microbatch's activation (FWD) or gradient (BWD) to the node at ``hop`` of its
        path, in the wire dtype."""
        meta = {"mb": m, "hop": hop, "eval": is_eval}
        msg = Message(kind, round=work.number, meta=meta, tensors=[tensor.detach().to("cpu", self.wire).contiguous()])
        self.send(node, work.endpoints[node], msg)

    def broadcast(self, kind: str, it: int, meta: dict[str, Any], roster: list[PeerInfo]) -> None:
        """Send to every node of ``roster``: stage-0 nodes first, in id order. A leader that
        dies mid-broadcast has then most likely reached the node that leads after it, which
        sends the plan on (``Planner.relay_orphaned_plan``); one that missed it would plan
        that iteration anew while others ran the dead leader's plan."""
        for p in sorted(roster, key=lambda p: (p.stage != 0, p.id)):
            msg = Message(kind, round=it, meta=meta)
            if p.id == self.me:
                msg.sender = self.me
                self.channel.put(msg)
            else:
                self.send(p.id, p.endpoint, msg)

    def reject(self, msg: Message, problem: str) -> None:
        """A malformed message is dropped and counted (``transport.dropped["Bad<kind>"]``)."""
        self.transport.dropped[f"Bad{msg.kind}"] += 1
        log.warning("dropped %s of iteration %d from %s: %s", msg.kind, msg.round, msg.sender, problem)
