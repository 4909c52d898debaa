"""``loco.Swarm``: this process's place in a swarm — a hivemind DHT node for finding peers and
a ZeroMQ endpoint for the data, opened together and closed together."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loco.node.config import NetworkConfig
from loco.node.runtime import build_shaper, node_seed, watched_membership
from loco.protocols.identity import NodeKey
from loco.protocols.membership import PeerInfo
from loco.protocols.transport import Transport

from .token import make_token, new_key, parse_token

log = logging.getLogger(__name__)


class Swarm:
    """Joins (or starts) the swarm ``run_id``: starts a DHT node (its own process and p2pd,
    as hivemind does) bootstrapped from ``initial_peers`` and binds one ZeroMQ socket.

    Secure by default. A process that starts a new swarm (no ``initial_peers``, no ``join``)
    makes a random ``key``; ``join_token`` is then what other processes pass as ``join=``
    to become members. Every message and every DHT record is signed with the key; unsigned
    or wrongly signed ones are dropped. ``key``: the swarm's shared secret, when you
    distribute it yourself. ``insecure=True``: no key at all (anyone who reaches a port can
    read and change the model); it must be asked for, and is logged.
    ``bootstrap_timeout_s``: how long to keep trying to reach
    ``initial_peers`` (a busy peer can refuse a (re)starting process's first attempts). ``network``: emulated bandwidth, latency, loss and cuts for
    what this process sends (``loco.Network``; the same fields as the ``[network]`` config
    section). ``stop``: an event that, once set, makes every wait on peers give up (the
    daemon sets it from its signal handler; the library installs none). ``identity``: a
    folder for this process's private keys, made on first use (``dht.key``: its DHT peer
    id, so with a fixed ``dht_port`` the multiaddress stays the same across restarts;
    ``node.key``: the key it signs its messages and records with, so peers know it as the
    same member after a restart). Without it each process makes new ones.

    One outer algorithm uses a swarm at a time: it announces this process's round in the
    DHT. ``close()`` (or leaving the ``with`` block) tells the swarm this process left,
    stops the DHT process and closes the socket."""

    def __init__(
        self,
        run_id: str = "loco",
        initial_peers: Sequence[str] = (),
        key: str | bytes | None = None,
        *,
        join: str | Sequence[str] | None = None,
        insecure: bool = False,
        node_id: str | None = None,
        listen_host: str = "127.0.0.1",
        announce_host: str | None = None,
        port: int = 0,
        dht_port: int = 0,
        announce_ttl_s: float = 8.0,
        bootstrap_timeout_s: float = 60.0,
        network: NetworkConfig | None = None,
        stop: threading.Event | None = None,
        identity: str | Path | None = None,
    ):
        if listen_host in ("0.0.0.0", "::") and not announce_host:
            raise ValueError("listen_host is a wildcard; pass announce_host, the address peers reach this one at")
        self.run_id = run_id
        self.id = node_id or f"node-{secrets.token_hex(3)}"
        self.stop_event = stop or threading.Event()
        self.initial_peers = list(initial_peers)
        self.round = 0
        self._stats: dict[str, float] = {"started": time.time()}  # published for `loco status`
        key = self._resolve_key(key, join, insecure, listen_host)
        self.key = key
        key_bytes = key.encode() if key else None
        self._rank_bytes: tuple[int, ...] = (0, 0, 0)
        self._network = network or NetworkConfig()
        self._started = time.time()
        self._hosts = (listen_host, announce_host)
        shaper = build_shaper(self._network, seed=node_seed(self.id), started=self._started)
        folder = Path(identity) if identity else None
        node_key = NodeKey.load_or_create(folder / "node.key") if folder else None
        self.transport = Transport(self.id, listen_host, port, announce_host, key_bytes, shaper=shaper,
                                   node_key=node_key)
        try:
            if folder:
                folder.mkdir(parents=True, exist_ok=True)
            self.membership, self._reaper = watched_membership(
                run_id, self.id, self.initial_peers, listen_host, dht_port, announce_host, announce_ttl_s,
                bootstrap_timeout_s, key=key_bytes, identity_path=str(folder / "dht.key") if folder else None,
                stop=self.stop_event, transport=self.transport)
        except BaseException:
            self.transport.close(flush_s=0)
            raise
        self._maddrs = tuple(self.membership.maddrs)
        self._announced = -1
        self._closed = False
        self.membership.start_refresh(self._info)
        self._announced = self.round

    def _resolve_key(self, key: str | bytes | None, join: str | Sequence[str] | None, insecure: bool,
                     listen_host: str) -> str | None:
        """The swarm key to use (None: insecure), and the peers a join token names."""
        if isinstance(key, bytes):
            key = key.decode()
        for token in [join] if isinstance(join, str) else list(join or []):
            token_key, peers = parse_token(token)
            if key and key != token_key:
                raise ValueError("the join tokens name different swarm keys (or differ from key=)")
            key = token_key
            self.initial_peers += [p for p in peers if p not in self.initial_peers]
        if key and insecure:
            raise ValueError("insecure=True with a swarm key: choose one")
        if insecure:
            loud = listen_host not in ("127.0.0.1", "localhost", "::1")
            (log.error if loud else log.warning)(
                "swarm %r runs WITHOUT a key: anyone who reaches %s can read the model, change it and "
                "impersonate peers%s", self.run_id, listen_host,
                " (and this node listens beyond loopback)" if loud else "")
            return None
        if not key:
            if self.initial_peers:
                raise ValueError("joining a swarm needs its key: pass join=TOKEN (the join_token its first process "
                                 "printed), or key=, or insecure=True on every process")
            key = new_key()  # a new swarm: its first process makes the key
        return key

    @property
    def join_token(self) -> str:
        """What another process passes as ``join=`` to join this swarm (treat it like a
        password; None for an insecure swarm, where the multiaddresses suffice)."""
        if self.key is None:
            raise ValueError("an insecure swarm has no join token: pass multiaddrs as initial_peers")
        return make_token(self.key, self.multiaddrs)

    def _info(self) -> PeerInfo:
        return PeerInfo(self.id, self.transport.endpoint, self.round, dht=self._maddrs, session=self.transport.session,
                        stats=self._stats)

    def rank_endpoint_spec(self) -> dict[str, Any]:
        """What another process of this member (a rank of a node of several) needs to open
        its own endpoint as this member: ``rank_transport`` takes it. It holds the member's
        signing key: hand it only to the member's own processes."""
        return {"node_id": self.id, "key": self.key, "node_key": self.transport.node_key.private_bytes(),
                "hosts": self._hosts, "network": self._network, "started": self._started}

    def known_peers(self) -> list[str]:
        """DHT multiaddresses of the live peers now: what a restart of this process can
        bootstrap from when the peer it first joined through is gone."""
        return [m for p in self.peers() for m in p.dht]

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
        """Data-plane bytes handed to the socket so far (measured, not estimated), by this
        process and by the other ranks of its member (as they last reported them)."""
        return self.transport.bytes_sent + self._rank_bytes[0]

    @property
    def bytes_queued(self) -> int:
        """Data-plane bytes handed to the transport so far: ``bytes_sent`` plus what an
        emulated network still holds back (equal without network emulation)."""
        return self.transport.bytes_queued + self._rank_bytes[1]

    @property
    def bytes_recv(self) -> int:
        return self.transport.bytes_recv + self._rank_bytes[2]

    def count_rank_bytes(self, counters: Sequence[Sequence[int]]) -> None:
        """The other ranks' endpoints' byte counters (sent, queued, received) so far: a
        member of several processes exchanging from every rank (``rank_exchange``)."""
        self._rank_bytes = tuple(sum(c[i] for c in counters) for i in range(3))

    def peers(self, strict: bool = False) -> list[PeerInfo]:
        """Live peers (not this process), sorted by id, as the DHT shows them now.
        ``strict``: a failed lookup raises ``ViewUnknown`` instead of showing nobody."""
        live = self.membership.peers(strict=strict)
        # the sockets of nodes that left (and what is queued on them) go, unless another
        # live node took the port
        for endpoint in set(self.membership.departed) - {p.endpoint for p in live}:
            self.transport.forget_peer(endpoint)
        return live

    def wait_for_peers(self, count: int, timeout_s: float) -> list[PeerInfo]:
        """Wait until ``count`` other peers are visible, ``timeout_s``, or the stop event;
        returns those seen."""
        return self.membership.wait_for_peers(count, timeout_s, self.stop_event)

    def publish_stats(self, stats: dict[str, float]) -> None:
        """Numbers about this process's training that ``loco status`` shows (e.g. step,
        loss, val_loss, steps_per_s, bytes_sent, bytes_recv, started): they go out with the
        next refresh of this process's DHT record (every announce_ttl_s / 3), replacing the
        previous ones (``started``, this process's start time, is always there). At most 31,
        names up to 32 characters."""
        bad = [k for k, v in stats.items() if not (isinstance(k, str) and len(k) <= 32 and isinstance(v, (int, float)))]
        if bad or len(stats) > 31:
            raise ValueError(f"stats must be at most 31 numbers named by strings of up to 32 characters; bad: "
                             f"{bad[:4]}")
        self._stats = {"started": self._stats["started"], **{k: float(v) for k, v in stats.items()}}

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


def rank_transport(spec: dict[str, Any], rank: int) -> Transport:
    """The ZeroMQ endpoint of rank ``rank`` of the member that gave ``spec``
    (``Swarm.rank_endpoint_spec``): the member's id and signing key, its hosts, and the same
    emulated network on its own link (a rank's traffic does not share rank 0's queue)."""
    listen_host, announce_host = spec["hosts"]
    shaper = build_shaper(spec["network"], seed=node_seed(f"{spec['node_id']}/rank{rank}"), started=spec["started"])
    key = spec["key"].encode() if spec["key"] else None
    return Transport(spec["node_id"], listen_host, 0, announce_host, key, shaper=shaper,
                     node_key=NodeKey.from_private_bytes(spec["node_key"]))
