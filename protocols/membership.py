"""Swarm membership through a real hivemind DHT.

Each node stores one record under ``<run_id>.peers`` with its node id as the subkey:
``{endpoint, round, stage, throughput, left, links, dht, session, stats}`` and an expiry of ``ttl_s``; in a
keyed swarm also the node's public key and its signature of the record (``pub``, ``sig``), so
a member can write only its own record (protocols/identity.py). A background
thread refreshes it every ``ttl_s / 3``, so a node that dies (even by SIGKILL) vanishes from
everyone's view within ``ttl_s`` seconds, and one that leaves cleanly writes ``left=True``
so the others drop it at once. Nothing else in loco needs a fixed peer list.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from .identity import IdentityPins, NodeKey, verify
from .transport import DropLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PeerInfo:
    """What a node tells the swarm about itself."""

    id: str
    endpoint: str
    round: int = 0
    stage: int = 0
    throughput: float = 0.0
    left: bool = False
    # measured links to other nodes: {peer id: [one-way latency s, bandwidth bytes/s]}
    links: dict[str, list[float]] = field(default_factory=dict, compare=False, hash=False)
    # the node's DHT multiaddresses: what a restarting peer bootstraps from
    dht: tuple[str, ...] = field(default=(), compare=False)
    # which start of the node this is (its transport's session): a record with another one
    # means the process a round waits for has died and come back under the same id
    session: str = field(default="", compare=False)
    # what the node publishes about its training for operators (``loco status``): step,
    # losses, rates, bytes, when it started; numbers only
    stats: dict[str, float] = field(default_factory=dict, compare=False, hash=False)


MAX_STATS = 32  # entries of a record's stats read; the rest of a bloated one is ignored


@dataclass(frozen=True)
class PeerRecord:
    """A node's record as the DHT holds it now (``Membership.records``)."""

    peer: PeerInfo
    expires_in: float  # seconds left before it expires unless refreshed (refreshed every ttl/3)
    identity: str  # the first hex digits of the key that signed it ("" in an insecure swarm)


def _as_links(value: object) -> dict[str, list[float]]:
    if not isinstance(value, dict):
        return {}
    links = {}
    for peer, item in value.items():
        if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, (int, float)) for x in item):
            links[str(peer)] = [float(item[0]), float(item[1])]
    return links


def _as_stats(value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    stats = {}
    for k, v in list(value.items())[:MAX_STATS]:
        if isinstance(k, str) and len(k) <= 32 and isinstance(v, (int, float)) and not isinstance(v, bool) \
                and v == v and abs(v) != float("inf"):
            stats[k] = float(v)
    return stats


def peer_from_record(node_id: str, value: object) -> PeerInfo | None:
    """The PeerInfo a DHT record's value describes (None: malformed); whatever a record
    holds beyond its fields' types and bounds is left out."""
    if not isinstance(value, dict):
        return None
    try:
        return PeerInfo(
            id=node_id, endpoint=str(value["endpoint"]), round=int(value.get("round", 0)),
            stage=int(value.get("stage", 0)), throughput=float(value.get("throughput", 0.0)),
            left=bool(value.get("left", False)), links=_as_links(value.get("links")),
            dht=tuple(str(m) for m in value.get("dht", ()) if isinstance(m, str))[:8],
            session=str(value.get("session", ""))[:64], stats=_as_stats(value.get("stats")),
        )
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a malformed membership record for %r: %r", node_id, value)
        return None


def _canonical(value: Any) -> Any:
    """``value`` as the DHT gives it back, whatever it was stored as (tuples come back as
    lists; maps in any order): what a record's signature covers."""
    if isinstance(value, dict):
        return [[str(k), _canonical(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def _record_bytes(key: str, node_id: str, value: dict, expires: float) -> bytes:
    unsigned = {k: v for k, v in value.items() if k != "sig"}
    return b"loco-record-v1" + msgpack.packb([key, node_id, float(expires), _canonical(unsigned)], use_bin_type=True)


class ViewUnknown(ConnectionError):
    """The DHT lookup failed: who is live is unknown (not: nobody is)."""


class Membership:
    """A node's view of the swarm, backed by its own hivemind DHT node (and p2pd process)."""

    def __init__(
        self,
        run_id: str,
        node_id: str,
        initial_peers: list[str] | None = None,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        announce_host: str | None = None,
        ttl_s: float = 10.0,
        bootstrap_timeout_s: float = 0.0,
        key: bytes | None = None,
        identity_path: str | None = None,
        stop: threading.Event | None = None,
        node_key: NodeKey | None = None,
        pins: IdentityPins | None = None,
        on_process: Callable[[int], None] | None = None,
        client_mode: bool = False,
    ):
        """``bootstrap_timeout_s``: how long to keep trying to start the DHT node and reach
        ``initial_peers`` (0: one attempt). A busy peer's p2pd can refuse the first
        connections of a node that (re)starts beside it, and hivemind reports that at once
        as a failed start: retrying until the deadline is what lets a restart rejoin.
        ``identity_path``: the DHT node's private key, made there on first use and reused:
        its peer id, hence its multiaddress, stays the same across restarts. ``stop``:
        set, it ends the retries at once. ``node_key``, ``pins``: with a swarm ``key``, this
        node signs its record with ``node_key`` and believes a record only if it is signed
        by the key ``pins`` binds its node id to (share them with the transport).
        ``on_process``: called with the pid of each DHT process as soon as it is forked,
        before its bootstrap (which can take seconds), so that whoever must end it if this
        process dies knows of it from the start. ``client_mode``: a DHT node that reads and
        writes through its peers but serves nobody (``loco status``)."""
        import hivemind  # heavy import (grpc, p2p): keep it off the import path of the math
        from hivemind.utils import get_dht_time

        from .dht_records import SwarmKeyValidator  # imports hivemind too

        validators = [SwarmKeyValidator(key)] if key else []

        self.run_id = run_id
        self.node_id = node_id
        self.ttl_s = ttl_s
        self.node_key = (node_key or NodeKey.generate()) if key else None
        self.pins = pins or IdentityPins()
        self.ignored = DropLog(what="membership record")  # records not believed, by reason
        self._key = f"{run_id}.peers"
        self._get_time = get_dht_time
        host_maddrs = [f"/ip4/{listen_host}/tcp/{port}"]
        announce = [f"/ip4/{announce_host}/tcp/{port}"] if announce_host and port else None
        deadline = time.monotonic() + bootstrap_timeout_s
        for attempt in itertools.count(1):
            try:
                self.dht = hivemind.DHT(
                    initial_peers=list(initial_peers or []),
                    host_maddrs=host_maddrs,
                    announce_maddrs=announce,
                    start=False,
                    wait_timeout=60,
                    record_validators=validators,
                    identity_path=identity_path,
                    client_mode=client_mode,
                )
                self.dht.run_in_background(await_ready=False)
                if on_process is not None and self.dht.pid:
                    on_process(self.dht.pid)
                self.dht.wait_until_ready(timeout=max(60.0, deadline - time.monotonic()))
                break
            except Exception as exc:  # hivemind reports a dead bootstrap peer as a daemon start failure
                self._end_failed_start()
                where = f"initial peers {list(initial_peers or [])}" if initial_peers else f"{host_maddrs}"
                left = deadline - time.monotonic()
                if left <= 0 and attempt >= 2:  # one retry at least: a first attempt on a busy machine can outlast the deadline
                    raise ConnectionError(f"could not start the DHT node or reach {where} "
                                          f"({attempt} attempts): {exc}") from None
                log.warning("DHT start, attempt %d: could not reach %s (%s); retrying for %.0fs more",
                            attempt, where, str(exc).splitlines()[-1] if str(exc) else exc, left)
                # a backoff between attempts, bounded by the deadline; a stop request ends it
                if stop is not None and stop.wait(min(1.0, max(left, 0.0))):
                    raise ConnectionError(f"stopped while reaching {where}") from None
                if stop is None:
                    time.sleep(min(1.0, max(left, 0.0)))
        self._info: PeerInfo | None = None
        self.departed: list[str] = []  # endpoints of the nodes the last lookup showed as gone (left)
        self._valid_until: dict[str, float] = {}  # node id -> latest expiry a lookup showed for its record
        self._view_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _end_failed_start(self) -> None:
        """A start that failed ends its own process; one that timed out is still running."""
        dht = getattr(self, "dht", None)
        if dht is not None and dht.is_alive():
            dht.terminate()
            dht.join(5)

    @property
    def maddrs(self) -> list[str]:
        """Multiaddresses another node can pass as ``--initial-peer``."""
        return [str(m) for m in self.dht.get_visible_maddrs()]

    @property
    def pid(self) -> int | None:
        return self.dht.pid

    def announce(self, info: PeerInfo) -> bool:
        self._info = info
        value: dict[str, Any] = {k: v for k, v in asdict(info).items() if k != "id"}
        expires = self._get_time() + self.ttl_s
        if self.node_key is not None:
            value["pub"] = self.node_key.public
            value["sig"] = self.node_key.sign(_record_bytes(self._key, self.node_id, value, expires))
        try:
            return bool(self.dht.store(self._key, value, expires, subkey=self.node_id))
        except Exception as exc:  # the DHT process may be gone during shutdown
            log.warning("membership announce failed: %s", exc)
            return False

    def start_refresh(self, current: Callable[[], PeerInfo]) -> None:
        """Re-announce ``current()`` every ttl/3 seconds until :meth:`leave`."""

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                self.announce(current())

        self.announce(current())
        self._thread = threading.Thread(target=loop, name="loco-membership", daemon=True)
        self._thread.start()

    def peers(self, include_self: bool = False, strict: bool = False) -> list[PeerInfo]:
        """Live peers, sorted by id. Expired records and nodes that left are excluded.

        A lookup that fails, that does not even find this node's own record (it is
        refreshed every ttl/3, so a working lookup always sees it), or that misses a record
        an earlier lookup showed valid until later (records do not vanish before they
        expire; a DHT node that stopped answering can make a lookup partial) says nothing
        about who is live: ``strict`` raises ViewUnknown then; otherwise the result is
        what was found."""
        try:
            found = self.dht.get(self._key, latest=True)
        except Exception as exc:
            log.warning("membership lookup failed: %s", exc)
            found = None
        if strict and self._info is not None and not self._info.left and (
                found is None or not isinstance(found.value, dict) or self.node_id not in found.value):
            raise ViewUnknown("the DHT lookup failed or missed this node's own record")
        out: dict[str, PeerInfo] = {}
        departed: list[str] = []
        missed: list[str] = []
        if found is not None and isinstance(found.value, dict):
            now = self._get_time()
            seen: set[str] = set()
            expiry: dict[str, float] = {}
            for node_id, _, expires, peer in self._own_records(found.value, now):
                seen.add(node_id)
                if peer is not None and peer.left and peer.id != self.node_id:
                    departed.append(peer.endpoint)
                if peer is None or peer.left:
                    continue
                out[peer.id] = peer
                expiry[peer.id] = expires
            self.departed = departed
            with self._view_lock:  # lookups run on several threads (training, collective waits)
                for node_id in seen - out.keys():
                    self._valid_until.pop(node_id, None)
                for peer in out.values():
                    self._valid_until[peer.id] = max(expiry[peer.id], self._valid_until.get(peer.id, 0.0))
                # 1 s of slack: a record written just before it would expire may be in flight
                missed = sorted(n for n, until in self._valid_until.items() if n not in seen and until > now + 1.0)
                self._valid_until = {n: u for n, u in self._valid_until.items() if u > now}
        if strict and missed:
            raise ViewUnknown(f"the DHT lookup missed records still valid: {missed[:8]}")
        if include_self and self._info is not None:
            out[self.node_id] = self._info
        elif not include_self:
            out.pop(self.node_id, None)
        return [out[k] for k in sorted(out)]

    def records(self) -> list[PeerRecord]:
        """Every record the DHT holds now that is its node's own (the nodes that left
        included), sorted by id, with how long each has left to live. Raises if the lookup
        fails."""
        found = self.dht.get(self._key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        now = self._get_time()
        out = []
        for _, value, expires, peer in self._own_records(found.value, now):
            if peer is not None and peer.id != self.node_id:
                pub = value.get("pub")
                out.append(PeerRecord(peer, expires - now, pub.hex()[:16] if isinstance(pub, bytes) else ""))
        return sorted(out, key=lambda r: r.peer.id)

    def _own_records(self, records: dict, now: float) -> Iterator[tuple[str, Any, float, PeerInfo | None]]:
        """(node id, value, expiry, its PeerInfo or None if malformed) of every unexpired
        record that is its node's own."""
        for node_id, item in records.items():
            value = getattr(item, "value", None)
            expires = getattr(item, "expiration_time", 0)
            if expires >= now and self._believed(str(node_id), value, expires):
                yield str(node_id), value, expires, peer_from_record(str(node_id), value)

    def _believed(self, node_id: str, value: object, expires: float) -> bool:
        """Whether a record is its node's own: signed by the key that node id is bound to.
        A signed ``left`` record frees the id. Insecure swarms (no node key) believe all."""
        if self.node_key is None or node_id == self.node_id:
            return True
        pub = value.get("pub") if isinstance(value, dict) else None
        sig = value.get("sig") if isinstance(value, dict) else None
        if not (isinstance(pub, bytes) and isinstance(sig, bytes)
                and verify(pub, sig, _record_bytes(self._key, node_id, value, expires))):
            self.ignored.drop("UnsignedRecord", f"the record for {node_id[:64]!r} is not signed by the key it names")
            return False
        problem = self.pins.check(node_id, pub)
        if problem:
            self.ignored.drop("ForeignRecord", f"a record for {node_id[:64]!r} by another key: {problem}")
            return False
        if value.get("left"):
            self.pins.release(node_id, pub)
        return True

    def wait_for_peers(self, count: int, timeout_s: float, stop: threading.Event | None = None) -> list[PeerInfo]:
        """Wait until at least ``count`` other live peers are visible (or the timeout, or
        ``stop``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.peers()
            if len(found) >= count or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return found
            (stop or self._stop).wait(0.2)  # DHT has no change notification: poll it, with a deadline

    def leave(self) -> None:
        """Tell the swarm this node is gone, then stop refreshing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._info is not None:
            info = self._info
            self.announce(PeerInfo(**{**asdict(info), "left": True}))

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self.dht.shutdown()
        except Exception as exc:
            log.warning("DHT shutdown: %s", exc)
