"""What the daemon, the pipeline node and the library's ``Swarm`` share below all three:
a node's ZeroMQ transport and DHT membership built from their settings, stable node ids,
and atomic JSON files."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loco.protocols.identity import NodeKey
from loco.protocols.membership import Membership
from loco.protocols.shaper import Cut, LinkProfile, Shaper
from loco.protocols.transport import Transport
from loco.token import make_token, new_key

from .bandwidth import parse_bandwidth
from .config import Config, ConfigError, LinkConfig, NetworkConfig, config_to_dict
from .metrics import MetricsWriter
from .reaper import Reaper

if TYPE_CHECKING:
    from .live_metrics import LiveMetrics

log = logging.getLogger(__name__)


def default_node_id(out: Path) -> str:
    """Stable across restarts with the same output folder, unique across folders/hosts."""
    digest = hashlib.blake2b(f"{socket.gethostname()}:{out.resolve()}".encode(), digest_size=3).hexdigest()
    return f"node-{digest}"


def node_seed(node_id: str) -> int:
    """A per-node seed for the shaper's jitter and loss draws."""
    return int(hashlib.blake2b(node_id.encode(), digest_size=4).hexdigest(), 16)


def _link_profile(link: LinkConfig, with_bandwidth: bool) -> LinkProfile:
    bw = parse_bandwidth(link.bandwidth) if (with_bandwidth and link.bandwidth) else None
    return LinkProfile(bw, link.latency_ms / 1e3, link.jitter_ms / 1e3, link.loss)


def build_shaper(net: NetworkConfig, seed: int, started: float) -> Shaper:
    """The node's uplink bandwidth is shared by all its links; per-link entries may add
    their own bandwidth limit on top."""
    epoch = net.epoch or started
    return Shaper(
        default=_link_profile(net, with_bandwidth=False),
        per_peer={peer: _link_profile(link, with_bandwidth=True) for peer, link in net.links.items()},
        uplink_bps=parse_bandwidth(net.bandwidth) if net.bandwidth else None,
        cuts=[Cut(c.peer, epoch + c.start_s, epoch + c.end_s) for c in net.cuts],
        seed=seed,
    )


def open_transport(cfg: Config, node_id: str, started: float, identity: Path | None = None) -> Transport:
    """The node's ZeroMQ endpoint, signed with the swarm key and (``identity``: the folder
    that keeps it) the node's own key, shaped by its network profile. A restart signs with
    the same key: its peers, which bound its id to that key, keep believing it."""
    key = cfg.swarm.key.encode() if cfg.swarm.key else None
    node_key = NodeKey.load_or_create(identity / "node.key") if identity is not None else None
    return Transport(node_id, cfg.node.listen_host, cfg.node.port, cfg.node.announce_host, key,
                     shaper=build_shaper(cfg.network, seed=node_seed(node_id), started=started), node_key=node_key)


def open_membership(cfg: Config, node_id: str, transport: Transport) -> tuple[Membership, Reaper]:
    """The node's DHT membership, and a reaper that ends its DHT helpers if the node dies."""
    return watched_membership(cfg.swarm.run_id, node_id, cfg.swarm.initial_peers, cfg.node.listen_host,
                              cfg.node.dht_port, cfg.node.announce_host, cfg.swarm.announce_ttl_s,
                              cfg.swarm.bootstrap_timeout_s, cfg.swarm.key.encode() if cfg.swarm.key else None,
                              transport=transport)


def watched_membership(run_id: str, node_id: str, initial_peers: list[str], listen_host: str, dht_port: int,
                       announce_host: str | None, ttl_s: float, bootstrap_timeout_s: float = 0.0,
                       key: bytes | None = None, identity_path: str | None = None,
                       stop: threading.Event | None = None,
                       transport: Transport | None = None, client_mode: bool = False) -> tuple[Membership, Reaper]:
    """A DHT membership whose helper processes (the DHT process, p2pd) a reaper ends if this
    process dies without closing it. Given the node's ``transport``, it signs records with
    the same node key and shares the transport's bindings of node ids to keys."""
    reaper = Reaper()  # first: a node killed during the DHT's bootstrap leaves no orphan either
    try:
        membership = Membership(run_id, node_id, initial_peers, listen_host, dht_port, announce_host, ttl_s,
                                bootstrap_timeout_s, key, identity_path, stop,
                                node_key=transport.node_key if transport else None,
                                pins=transport.pins if transport else None,
                                on_process=lambda pid: reaper.watch([pid]), client_mode=client_mode)
    except BaseException:
        reaper.close()
        raise
    return membership, reaper


def with_swarm_key(cfg: Config, out: Path) -> Config:
    """``cfg`` with the swarm key this node uses: the configured one (or LOCO_SWARM_KEY);
    for a node that starts a new swarm, the one it made the first time it ran with this
    ``--out`` (kept in ``identity/swarm.key``, readable by its owner only), so that a
    restart with the same command leads the same swarm. ConfigError for a node that joins
    without the key."""
    s = cfg.swarm
    if s.key or s.insecure:
        return cfg
    if s.initial_peers:
        raise ConfigError("joining a swarm needs its key: start with --join TOKEN (printed by a member as "
                          "'join:'), or set swarm.key (env LOCO_SWARM_KEY), or swarm.insecure = true on every node")
    path = out / "identity" / "swarm.key"
    if not path.exists():
        # under torchrun every rank of the node runs this with the same --out at once: each
        # writes a whole key aside and links it in place; the first link wins, the others
        # read that one (never a half-written file)
        path.parent.mkdir(parents=True, exist_ok=True)
        aside = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key() + "\n")
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            aside.unlink()
    key = path.read_text().strip()
    return cfg.model_copy(update={"swarm": s.model_copy(update={"key": key})})


def with_announce_address(cfg: Config) -> Config:
    """``cfg`` with ``node.announce_host`` as an IP address: a host name (a container's
    service name, a DNS name) is resolved once, here, since DHT multiaddresses name an
    IP (/ip4/...). ConfigError for a name that does not resolve."""
    host = cfg.node.announce_host
    if host is None:
        return cfg
    try:
        ipaddress.ip_address(host)
        return cfg
    except ValueError:
        pass
    try:
        resolved = socket.gethostbyname(host)
    except OSError as exc:
        raise ConfigError(f"node.announce_host {host!r} does not resolve to an address ({exc})") from None
    log.info("announcing %s as %s", host, resolved)
    return cfg.model_copy(update={"node": cfg.node.model_copy(update={"announce_host": resolved})})


def join_token_before_start(cfg: Config, out: Path) -> str:
    """The join token of the node ``cfg`` and ``out`` describe, before it starts: its swarm
    key, its announced (or listen) address, its DHT port and the peer id of the DHT
    identity it keeps under ``out`` (made here if it has none). Every start with the same
    command listens there with that identity, so the token stays valid across restarts."""
    if cfg.swarm.insecure:
        raise ConfigError("--print-join-token: an insecure swarm has no join token (pass --initial-peer "
                          "multiaddresses instead)")
    if not cfg.swarm.key:
        raise ConfigError("--print-join-token: the swarm key is not known yet (with --join-file it comes from "
                          "that file once it exists: use --join TOKEN, or print the token of the first node)")
    host = cfg.node.announce_host or cfg.node.listen_host
    identity = NodeIdentity(out, cfg.node.id or default_node_id(out))
    port = identity.apply(cfg).node.dht_port
    if host in ("0.0.0.0", "::") or not port:
        raise ConfigError("--print-join-token needs a fixed address: --announce HOST (or --listen HOST) and "
                          "--dht-port N (or a previous start with this --out, whose port is remembered)")
    from hivemind.p2p import P2P, PeerID  # (heavy: only here)

    path = identity.dir / "dht.key"
    if not path.exists():
        identity.dir.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    peer_id = PeerID.from_identity(path.read_bytes())
    return make_token(cfg.swarm.key, [f"/ip4/{host}/tcp/{port}/p2p/{peer_id}"])


class NodeIdentity:
    """What a node keeps in ``OUT/identity/NODE_ID`` (several nodes may share one ``--out``) so that a restart with the same command is the
    same node to the swarm: its private keys (``dht.key``: its DHT peer id; ``node.key``: the
key its messages and records are signed with), the ports it listened on
    (so its multiaddress), and the DHT addresses of the peers it last saw (so it finds the
    swarm again when the peer it first joined through is gone)."""

    def __init__(self, out: Path, node_id: str):
        self.dir = out / "identity" / node_id


    def _read(self, name: str) -> Any:
        path = self.dir / name
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            log.warning("ignoring an unreadable %s", path)
            return None

    def apply(self, cfg: Config) -> Config:
        """``cfg`` with the remembered peers added to its initial peers and the remembered
        ports, where the config leaves them to the OS and they are free."""
        remembered = self._read("ports.json") or {}
        node = {}
        for field, host in (("port", cfg.node.listen_host), ("dht_port", cfg.node.listen_host)):
            old = remembered.get(field)
            if getattr(cfg.node, field) == 0 and isinstance(old, int) and _port_free(host, old):
                node[field] = old
        peers = [p for p in self._read("peers.json") or [] if isinstance(p, str)]
        extra = [p for p in peers if p not in cfg.swarm.initial_peers]
        return cfg.model_copy(update={
            "node": cfg.node.model_copy(update=node),
            "swarm": cfg.swarm.model_copy(update={"initial_peers": [*cfg.swarm.initial_peers, *extra]}),
        })

    def remember_ports(self, port: int, dht_maddrs: list[str]) -> None:
        dht = next((int(m.split("/tcp/")[1].split("/")[0]) for m in dht_maddrs if "/tcp/" in m), 0)
        write_json_atomic(self.dir / "ports.json", {"port": port, "dht_port": dht})

    def remember_peers(self, maddrs: list[str]) -> None:
        if maddrs and maddrs != self._read("peers.json"):
            write_json_atomic(self.dir / "peers.json", maddrs)

    def forget_peers(self) -> None:
        (self.dir / "peers.json").unlink(missing_ok=True)


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def open_live_metrics(cfg: Config, node_id: str, metrics: MetricsWriter) -> LiveMetrics | None:
    """The node's /metrics endpoint when ``node.metrics_port`` is set, fed every record
    ``metrics`` writes from now on (None: off)."""
    port = cfg.node.metrics_port
    if port is None:
        return None
    from .live_metrics import LiveMetrics  # prometheus_client only where asked for

    try:
        live = LiveMetrics(node_id, cfg.node.listen_host, port, public_host=cfg.node.announce_host)
    except OSError as exc:
        raise ConfigError(f"node.metrics_port = {port}: cannot listen on {cfg.node.listen_host}:{port} "
                          f"({exc.strerror or exc})") from None
    metrics.add_sink(live.observe)
    log.info("live metrics at %s", live.url)
    return live


def open_record_sinks(cfg: Config, node_id: str, out: Path, metrics: MetricsWriter) -> list[Callable[[], None]]:
    """TensorBoard and W&B copies of the records ``metrics`` writes from now on, as
    ``logging.*`` asks; returns what closes them."""
    from .sinks import TensorBoardSink, WandbSink  # their packages only where asked for

    sinks: list[Any] = []
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(out / "tensorboard" / node_id))
    if cfg.logging.wandb != "off":
        sinks.append(WandbSink(out / "wandb", cfg.logging.wandb, cfg.logging.wandb_project, node_id,
                               config_to_dict(cfg, redact=True)))
    for sink in sinks:
        metrics.add_sink(sink.observe)
    return [sink.close for sink in sinks]


class NodeRecords:
    """A node's records: its resolved config (``config/<id>.json``), the JSONL metrics file,
    and the copies that ``node.metrics_port`` and ``logging.*`` ask for, all fed from the
    same records. Opened at a node's start (it also applies ``node.threads``), closed last."""

    def __init__(self, cfg: Config, node_id: str, out: Path):
        import torch

        if cfg.node.threads:
            torch.set_num_threads(cfg.node.threads)
        self.out, self.node_id = out, node_id
        self.write_config(cfg)
        self.metrics = MetricsWriter(out / "metrics" / f"{node_id}.jsonl", node_id)
        self.live = open_live_metrics(cfg, node_id, self.metrics)
        self._sinks = open_record_sinks(cfg, node_id, out, self.metrics)

    def write_config(self, cfg: Config) -> None:
        """The config this node runs with, secrets redacted (written again if it changes)."""
        write_json_atomic(self.out / "config" / f"{self.node_id}.json", config_to_dict(cfg, redact=True))

    def close(self) -> None:
        """The metrics file first (its last records reach the copies), then the copies; each
        step logged if it fails, the others still run."""
        attempt("metrics", self.metrics.close)
        if self.live is not None:
            attempt("live metrics", self.live.close)
        for close in self._sinks:
            attempt("a metrics sink", close)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def attempt(what: str, step: Callable[[], object]) -> None:
    """Run one step of a node's shutdown; a failure is logged, never raised, so the steps
    after it still run."""
    try:
        step()
    except Exception:
        log.exception("shutdown of %s failed", what)
