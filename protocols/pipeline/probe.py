"""Measure the links to other nodes: one-way latency and bandwidth, over the real transport.

A probe is a PING the peer's I/O thread answers at once with a small PONG. The latency is
half the smallest round trip of a few small probes; the bandwidth comes from what a large
probe (the size of an activation) adds to that round trip, the least of a few: like the
smallest round trip, the least delayed probe is the one that says the most about the link
(on a busy machine a thread that runs late adds tens of milliseconds to any one probe, which
made one probe alone read a 24 MB/s link as 3 MB/s). Messages go through the node's own
transport, so an emulated network (the shaper) is measured like a real one; the answer
goes back over the emulated link to the asker (its endpoint is named to the shaper), not
over the default one.
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
            # the answer takes the emulated link to the asker, as its other traffic does
            self.transport.name_peer(endpoint, msg.sender)
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

    def _answered(self, endpoint: str, peer: str, payload: torch.Tensor | None, count: int,
                  timeout_s: float) -> list[float]:
        """Up to ``count`` round trips; stops at the first probe left unanswered (the peer
        died, or does not serve yet): probing on would only add a timeout each."""
        rtts = []
        for _ in range(count):
            rtt = self._round_trip(endpoint, peer, payload, timeout_s)
            if rtt is None:
                break
            rtts.append(rtt)
        return rtts

    def measure(self, peers: dict[str, str], payload_bytes: int, small: int = 3, large: int = 3,
                timeout_s: float = 10.0) -> dict[str, tuple[float, float]]:
        """{peer: (one-way latency s, bandwidth bytes/s)} for every peer that answered:
        ``small`` probes of no payload for the latency, ``large`` of ``payload_bytes`` for
        the bandwidth (a large probe unanswered in ``timeout_s`` counts as taking it)."""
        payload = torch.zeros(max(1, payload_bytes // 4), dtype=torch.float32)
        out: dict[str, tuple[float, float]] = {}
        for peer, endpoint in peers.items():
            self.transport.name_peer(endpoint, peer)
            rtts = self._answered(endpoint, peer, None, small, timeout_s)
            if not rtts:
                continue
            base = min(rtts)
            bigs = self._answered(endpoint, peer, payload, large, timeout_s)
            extra = max(1e-6, min(bigs, default=timeout_s) - base)
            out[peer] = (base / 2, min(1e11, payload.numel() * 4 / extra))
        return out
