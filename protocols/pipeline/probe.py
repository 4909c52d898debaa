"""Measure the links to other nodes: one-way latency and bandwidth, over the real transport.

A probe is a PING the peer's I/O thread answers at once with a small PONG. The latency is
half the smallest round trip of a few small probes; the bandwidth is what one large probe
(the size of an activation) adds to that round trip. Messages go through the node's own
transport, so an emulated network (the shaper) is measured like a real one.
"""

from __future__ import annotations

import itertools
import time

import torch

from ..messages import PP_PING, PP_PONG
from ..transport import Transport
from ..wire import Message

PING, PONG = PP_PING, PP_PONG


class LinkProber:
    def __init__(self, transport: Transport):
        self.transport = transport
        self._ids = itertools.count(1)
        transport.on(PING, self._answer)

    def _answer(self, msg: Message) -> None:
        endpoint = msg.meta.get("reply_to")
        if isinstance(endpoint, str):
            self.transport.send(endpoint, Message(PONG, round=msg.round, meta={}))

    def _round_trip(self, endpoint: str, peer: str, payload: torch.Tensor | None, timeout_s: float) -> float | None:
        probe = next(self._ids)
        t0 = time.monotonic()
        tensors = [payload] if payload is not None else []
        self.transport.send(endpoint, Message(PING, round=probe, meta={"reply_to": self.transport.endpoint},
                                              tensors=tensors))
        if self.transport.recv(PONG, probe, sender=peer, timeout_s=timeout_s) is None:
            return None
        return time.monotonic() - t0

    def measure(self, peers: dict[str, str], payload_bytes: int, small: int = 3,
                timeout_s: float = 10.0) -> dict[str, tuple[float, float]]:
        """{peer: (one-way latency s, bandwidth bytes/s)} for every peer that answered."""
        payload = torch.zeros(max(1, payload_bytes // 4), dtype=torch.float32)
        out: dict[str, tuple[float, float]] = {}
        for peer, endpoint in peers.items():
            self.transport.name_peer(endpoint, peer)
            rtts = [self._round_trip(endpoint, peer, None, timeout_s) for _ in range(small)]
            rtts = [r for r in rtts if r is not None]
            if not rtts:
                continue
            base = min(rtts)
            big = self._round_trip(endpoint, peer, payload, timeout_s)
            extra = max(1e-6, (big if big is not None else timeout_s) - base)
            out[peer] = (base / 2, min(1e11, payload.numel() * 4 / extra))
        return out
