"""``loco.Swarm``: this process's place in a swarm — a hivemind DHT node for finding peers and
a ZeroMQ endpoint for the data, opened together and closed together."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence

from loco.node.config import NetworkConfig
from loco.node.runtime import build_shaper, node_seed, watched_membership
from loco.protocols.membership import PeerInfo
from loco.protocols.transport import Transport

log = logging.getLogger(__name__)


class Swarm:
    """Joins (or starts) the swarm ``run_id``: starts a DHT node (its own process and p2pd,
    as hivemind does) bootstrapped from ``initial_peers`` and binds one ZeroMQ socket.

    ``key``: a shared secret; every message is signed with it and unsigned or wrongly
    signed ones are dropped. ``bootstrap_timeout_s``: how long to keep trying to reach
    ``initial_peers`` (a busy peer can refuse a (re)starting process's first attempts). ``network``: emulated bandwidth, latency, loss and cuts for
    what this process sends (``loco.Network``; the same fields as the ``[network]`` config
    section). ``stop``: an event that, once set, makes every wait on peers give up (the
    daemon sets it from its signal handler; the library installs none).

    One outer algorithm uses a swarm at a time: it announces this process's round in the
    DHT. ``close()`` (or leaving the ``with`` block) tells the swarm this process left,
    stops the DHT process and closes the socket."""

    def __init__(
        self,
        run_id: str = "loco",
        initial_peers: Sequence[str] = (),
        key: str | bytes | None = None,
        *,
        node_id: str | None = None,
        listen_host: str = "127.0.0.1",
        announce_host: str | None = None,
        port: int = 0,
        dht_port: int = 0,
        announce_ttl_s: float = 8.0,
        bootstrap_timeout_s: float = 60.0,
        network: NetworkConfig | None = None,
        stop: threading.Event | None = None,
    ):
        if listen_host in ("0.0.0.0", "::") and not announce_host:
            raise ValueError("listen_host is a wildcard; pass announce_host, the address peers reach this one at")
        self.run_id = run_id
        self.id = node_id or f"node-{secrets.token_hex(3)}"
        self.stop_event = stop or threading.Event()
        self.initial_peers = list(initial_peers)
        self.round = 0
        key_bytes = key.encode() if isinstance(key, str) else key
        shaper = build_shaper(network or NetworkConfig(), seed=node_seed(self.id), started=time.time())
        self.transport = Transport(self.id, listen_host, port, announce_host, key_bytes, shaper=shaper)
        try:
            self.membership, self._reaper = watched_membership(run_id, self.id, self.initial_peers, listen_host,
                                                               dht_port, announce_host, announce_ttl_s,
                                                               bootstrap_timeout_s)
        except BaseException:
            self.transport.close(flush_s=0)
            raise
        self._announced = -1
        self._closed = False
        self.membership.start_refresh(self._info)
        self._announced = self.round

    def _info(self) -> PeerInfo:
        return PeerInfo(self.id, self.transport.endpoint, self.round)

    # ------------------------------------------------------------------ public
    @property
    def multiaddrs(self) -> list[str]:
        """DHT multiaddresses another process passes as ``initial_peers`` to join."""
        return self.membership.maddrs

    @property
    def endpoint(self) -> str:
        """This process's ZeroMQ endpoint (``tcp://host:port``)."""
        return self.transport.endpoint

    @property
    def bytes_sent(self) -> int:
        """Data-plane bytes handed to the socket so far (measured, not estimated)."""
        return self.transport.bytes_sent

    @property
    def bytes_recv(self) -> int:
        return self.transport.bytes_recv

    def peers(self) -> list[PeerInfo]:
        """Live peers (not this process), sorted by id, as the DHT shows them now."""
        return self.membership.peers()

    def wait_for_peers(self, count: int, timeout_s: float) -> list[PeerInfo]:
        """Wait until ``count`` other peers are visible, or ``timeout_s``; returns those seen."""
        return self.membership.wait_for_peers(count, timeout_s)

    def announce_round(self, round: int) -> None:
        """Tell the DHT this process is at ``round`` (its outer algorithm calls this)."""
        self.round = round
        if round != self._announced:
            self.membership.announce(self._info())
            self._announced = round

    def close(self) -> None:
        """Leave the swarm: mark this process as gone in the DHT, stop the DHT process and its
        p2pd, close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for step in (self.membership.leave, self.membership.shutdown, self.transport.close, self._reaper.close):
            try:
                step()
            except Exception:  # one failing step must not keep the others from running
                log.exception("closing the swarm: %s failed", step)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Swarm(run_id={self.run_id!r}, id={self.id!r}, endpoint={self.endpoint!r})"
