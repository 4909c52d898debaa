"""`loco status`'s parts that need no swarm: how records become rows, where the swarm is
found, and what a record's stats may hold (a forged one cannot bloat or break the view).
The command itself runs against a real 3-node swarm in tests/test_swarm.py."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from loco.node.config import ConfigError
from loco.node.status import row, table, target_of
from loco.protocols.membership import MAX_STATS, PeerInfo, PeerRecord, peer_from_record
from loco.token import make_token


def _record(left: bool = False, expires_in: float = 7.0, **stats: float) -> PeerRecord:
    return PeerRecord(PeerInfo("node1", "tcp://10.0.0.2:5555", round=4, left=left, session="abc",
                               stats={"started": 1000.0, **stats}), expires_in, "00ff00ff00ff00ff")


def test_rows_say_live_stale_or_left():
    assert row(_record(step=40, loss=2.5), ttl_s=9.0, now=1060.0) | {} == {
        "node": "node1", "state": "live", "endpoint": "tcp://10.0.0.2:5555", "round": 4,
        "identity": "00ff00ff00ff00ff", "session": "abc", "started": 1000.0, "up_s": 60.0, "step": 40, "loss": 2.5}
    assert row(_record(expires_in=2.0), ttl_s=9.0, now=1060.0)["state"] == "stale"  # missed a refresh
    assert row(_record(left=True), ttl_s=9.0, now=1060.0)["state"] == "left"
    console = Console(width=200, record=True)
    console.print(table([row(_record(step=40), 9.0, 1060.0)], "t"))
    shown = console.export_text()
    assert "node1" in shown and "live" in shown and "00ff00ff00ff00ff" in shown and "0:01:00" in shown


def test_record_stats_keep_numbers_only():
    value = {"endpoint": "tcp://h:1", "stats": {"step": 3, "loss": float("nan"), "name": "x", "flag": True,
                                                "x" * 40: 1.0, **{f"k{i}": i for i in range(100)}}}
    stats = peer_from_record("n", value).stats
    assert stats["step"] == 3.0 and "loss" not in stats and "name" not in stats and "flag" not in stats
    assert len(stats) <= MAX_STATS
    assert peer_from_record("n", {"endpoint": "tcp://h:1", "stats": "junk"}).stats == {}


def test_where_the_swarm_is_found(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="needs where to find the swarm"):
        target_of([], None, None, None, None)
    with pytest.raises(ConfigError, match="--join: not a loco join token"):
        target_of([], "garbage", None, None, None)
    with pytest.raises(ConfigError, match="no nodes/"):
        target_of([], None, tmp_path, None, None)
    t = target_of(["/ip4/1.2.3.4/tcp/5/p2p/Qm"], make_token("k3y", ["/ip4/5.6.7.8/tcp/9/p2p/Qm"]), None, None, None)
    assert (t.key, t.run_id, t.initial_peers) == ("k3y", "loco", ["/ip4/1.2.3.4/tcp/5/p2p/Qm",
                                                                  "/ip4/5.6.7.8/tcp/9/p2p/Qm"])
    (tmp_path / "nodes").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "nodes" / "node0.json").write_text(json.dumps(
        {"maddrs": ["/ip4/127.0.0.1/tcp/7/p2p/Qm"], "join": make_token("s3cret", ["/ip4/127.0.0.1/tcp/7/p2p/Qm"])}))
    (tmp_path / "config" / "node0.json").write_text(json.dumps({"swarm": {"run_id": "exp", "announce_ttl_s": 4}}))
    t = target_of([], None, tmp_path, None, None)
    assert (t.key, t.run_id, t.ttl_s, t.initial_peers) == ("s3cret", "exp", 4.0, ["/ip4/127.0.0.1/tcp/7/p2p/Qm"])
