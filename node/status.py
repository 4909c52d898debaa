"""`loco status`: the swarm as its DHT shows it, from a DHT client that never trains.

Every node's membership record carries its endpoint, round, session, public key and the
small ``stats`` it publishes (step, losses, step rate, bytes, outcomes, when it started);
this reads them all (live, stale and left nodes) and shows them as a table, refreshed until
Ctrl-C, or once as JSON for scripts.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loco.protocols.membership import PeerRecord
from loco.token import parse_token

from .config import ConfigError
from .runtime import watched_membership


@dataclass(frozen=True)
class Target:
    """Which swarm to look at: its run id, key and where to reach it."""

    run_id: str
    key: str | None
    initial_peers: list[str]
    ttl_s: float = 8.0  # the swarm's announce_ttl_s: a record not refreshed for a third of it is stale


def target_of(initial_peers: list[str], join: str | None, run_dir: Path | None, run_id: str | None,
              key: str | None) -> Target:
    """From the command line: a join token (key + peers), or a run's --out folder (its
    nodes' addresses, key and run id), or bare multiaddresses with a key from the
    environment (LOCO_SWARM_KEY) or none (an insecure swarm)."""
    peers = list(initial_peers)
    ttl_s = Target.ttl_s
    if join:
        try:
            key, from_token = parse_token(join)
        except ValueError as exc:
            raise ConfigError(f"--join: {exc}") from None
        peers += from_token
    if run_dir is not None:
        infos = sorted((run_dir / "nodes").glob("*.json"))
        if not infos:
            raise ConfigError(f"--run-dir {run_dir}: no nodes/*.json (is it a node's or swarm's --out folder?)")
        for path in infos:
            try:
                info = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # (a node writing it right now)
            peers += [m for m in info.get("maddrs", []) if isinstance(m, str)]
            if key is None and isinstance(info.get("join"), str):
                key = parse_token(info["join"])[0]
            config = run_dir / "config" / path.name
            if config.exists():
                swarm = json.loads(config.read_text()).get("swarm", {})
                run_id = run_id or swarm.get("run_id")
                ttl_s = swarm.get("announce_ttl_s", ttl_s)
    if not peers:
        raise ConfigError("loco status needs where to find the swarm: --initial-peer MADDR, --join TOKEN or "
                          "--run-dir DIR")
    return Target(run_id or "loco", key, list(dict.fromkeys(peers)), float(ttl_s))


def row(record: PeerRecord, ttl_s: float, now: float) -> dict[str, Any]:
    """One node as `loco status --json` prints it."""
    p, stats = record.peer, record.peer.stats
    state = "left" if p.left else ("stale" if record.expires_in < ttl_s / 3 else "live")
    started = stats.get("started")
    return {"node": p.id, "state": state, "endpoint": p.endpoint, "round": p.round, "identity": record.identity,
            "session": p.session, "started": started, "up_s": now - started if started else None,
            **{k: v for k, v in stats.items() if k != "started"}}


class StatusClient:
    """A DHT client (it never stores a record and never trains) reading ``target``'s
    membership records."""

    def __init__(self, target: Target, timeout_s: float = 60.0):
        self.ttl_s = target.ttl_s
        self.membership, self._reaper = watched_membership(
            target.run_id, f"status-{secrets.token_hex(4)}", target.initial_peers, "127.0.0.1", 0, None,
            target.ttl_s, timeout_s, target.key.encode() if target.key else None, client_mode=True)

    def rows(self) -> list[dict[str, Any]]:
        now = time.time()
        return [row(r, self.ttl_s, now) for r in self.membership.records()]

    def close(self) -> None:
        self.membership.shutdown()
        self._reaper.close()

    def __enter__(self) -> StatusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


COLUMNS = [("node", "node", "{}"), ("state", "state", "{}"), ("round", "round", "{}"), ("step", "step", "{:.0f}"),
           ("loss", "loss", "{:.3f}"), ("val", "val_loss", "{:.3f}"), ("steps/s", "steps_per_s", "{:.2f}"),
           ("sent MB", "sent_mb", "{:.1f}"), ("recv MB", "recv_mb", "{:.1f}"), ("ok/skip", "outcomes", "{}"),
           ("started", "started", "{}"), ("up", "up_s", "{}"), ("identity", "identity", "{}"),
           ("endpoint", "endpoint", "{}")]


def _cell(r: dict[str, Any], field: str, fmt: str) -> str:
    if field == "sent_mb" or field == "recv_mb":
        value = r.get("bytes_sent" if field == "sent_mb" else "bytes_recv")
        return "-" if value is None else f"{value / 1e6:.1f}"
    if field == "outcomes":
        return f"{r.get('ok', 0):.0f}/{r.get('skipped', 0):.0f}" if "ok" in r else "-"
    if field == "started":  # this process's start: when the node last (re)started
        return "-" if r.get("started") is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"]))
    if field == "up_s":
        up = r.get("up_s")
        return "-" if up is None else f"{int(up // 3600)}:{int(up % 3600 // 60):02d}:{int(up % 60):02d}"
    value = r.get(field)
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict[str, Any]], title: str):
    from rich.table import Table

    t = Table(title=title)
    for name, _, _ in COLUMNS:
        t.add_column(name, no_wrap=True)
    for r in rows:
        t.add_row(*(_cell(r, field, fmt) for _, field, fmt in COLUMNS))
    return t
