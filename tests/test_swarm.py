"""Real swarms: node processes started through the CLI on 127.0.0.1 (OS-chosen ports),
finding each other through a real hivemind DHT, talking over real ZeroMQ sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from loco.node.checkpoint import load_checkpoint, previous
from loco.protocols.state_sync import tensors_hash
from tests.conftest import FAST, group_members, read_records, wait_until

pytestmark = pytest.mark.swarm


def _sets(*items: str) -> list[str]:
    """FAST, then ``items``; a pipeline (pipeline.stages set) leaves out the keys it rejects."""
    pipeline = any(i.startswith("pipeline.stages=") for i in items)
    fast = [f for f in FAST if not (pipeline and f.split("=")[0] in ("optim.inner_steps", "train.log_every"))]
    return [arg for item in [*fast, *items] for arg in ("--set", item)]


def _outer(out: Path, node: str) -> list[dict]:
    return [r for r in read_records(out / "metrics" / f"{node}.jsonl") if r["event"] == "outer"]


def _hashes_by_round(out: Path, nodes: list[str]) -> dict[int, dict[str, str]]:
    by_round: dict[int, dict[str, str]] = defaultdict(dict)
    for n in nodes:
        for r in _outer(out, n):
            if r["status"] == "ok":
                by_round[r["round"]][n] = r["weights_hash"]
    return by_round


def _node_args(out: Path, node: str, *extra: str, peer: str | None = None, via_node0: bool = False) -> list[str]:
    """``node start`` arguments; ``peer``: the token it joins with; ``via_node0``: it joins
    through node0's info file instead, started at once (its imports overlap node0's start)."""
    args = ["node", "start", "--out", str(out), "--node-id", node, *_sets(*extra)]
    if peer:
        args += ["--join", peer]
    if via_node0:
        args += ["--join-file", str(out / "nodes" / "node0.json")]
    return args


def _start_node(procs, out: Path, node: str, *extra: str, peer: str | None = None, via_node0: bool = False):
    return procs.loco(*_node_args(out, node, *extra, peer=peer, via_node0=via_node0), log=node)


def _staged_node(procs, out: Path, node: str, *extra: str, peer: str | None = None):
    """``_start_node``, started now but run at ``.go()`` (a restart, a late joiner)."""
    return procs.staged_loco(*_node_args(out, node, *extra, peer=peer), log=node)


def _ready(out: Path, node: str) -> dict:
    path = out / "nodes" / f"{node}.json"
    return wait_until(lambda: path.exists() and json.loads(path.read_text()), 180, f"{node} to start")


def _wait_exit(proc: subprocess.Popen, timeout_s: float, name: str, procs) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} did not finish in {timeout_s}s; log:\n{procs.log(name)[-3000:]}") from None


def test_swarm_of_three_trains_agrees_and_stops_cleanly_on_ctrl_c(procs, tmp_path):
    out = tmp_path / "run"
    nodes = ["node0", "node1", "node2"]
    # with a swarm key: every message is signed and checked. It trains until Ctrl-C.
    p = procs.loco("swarm", "--nodes", "3", "--out", str(out),
                   *_sets("train.rounds=0", "swarm.key='s3cret'", "node.metrics_port=0", "logging.tensorboard=true"),
                   log="swarm")
    for n in nodes:
        wait_until(lambda n=n: len(_outer(out, n)) >= 2, 300, f"{n}'s second round")
    early = {n: _scrape(_ready(out, n)["metrics"]) for n in nodes}  # live metrics, while training
    for n in nodes:
        wait_until(lambda n=n: len(_outer(out, n)) >= 4, 300, f"{n}'s fourth round")
    for n in nodes:
        _check_live_metrics(early[n], _scrape(_ready(out, n)["metrics"]), n)
    # `loco status`: a DHT client reads every node's record (key and addresses from --out)
    shown = subprocess.run([sys.executable, "-m", "loco.node.cli", "status", "--run-dir", str(out), "--once",
                            "--json"], capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr[-3000:]
    rows = {r["node"]: r for r in json.loads(shown.stdout)}
    assert sorted(rows) == nodes, rows
    for r in rows.values():
        assert r["state"] == "live" and r["round"] >= 3 and r["endpoint"].startswith("tcp://127.0.0.1:")
        assert r["step"] >= 2 * 8 and r["ok"] >= 2 and r["loss"] > 0 and r["steps_per_s"] > 0, r
        assert r["bytes_sent"] > 0 and r["up_s"] > 0 and len(r["identity"]) == 16
    pids = [json.loads((out / "nodes" / f"{n}.json").read_text())["pid"] for n in nodes]
    p.send_signal(signal.SIGINT)
    assert _wait_exit(p, 180, "swarm", procs) == 0, procs.log("swarm")[-3000:]
    for n, pid in zip(nodes, pids, strict=True):
        records = read_records(out / "metrics" / f"{n}.jsonl")
        outer = [r for r in records if r["event"] == "outer"][:4]  # (the round Ctrl-C cut may be partial)
        assert [r["round"] for r in outer] == [0, 1, 2, 3]
        for r in outer:
            for key in ("time", "node", "step", "round", "loss", "val_loss", "bytes_sent", "bytes_recv",
                        "group_size", "compute_s", "comm_s", "weights_hash"):
                assert key in r
        assert all(r["status"] == "ok" and r["group_size"] == 3 for r in outer), outer
        for r in outer:  # the parts of a round add up to its wall time, measured on its own
            parts = sum(r.get(k, 0.0) for k in ("compute_s", "comm_s", "publish_s", "weights_hash_s", "eval_s",
                                                "checkpoint_s"))
            assert abs(parts - r["wall_s"]) <= 0.02 * r["wall_s"], r
            assert r["utilization"] == pytest.approx(r["compute_s"] / r["wall_s"])
        # checkpoints written in the background, the one from training and the final one,
        # each hold one round's state: the synchronized weights of the round they follow
        rounds = {r["next_round"]: r for r in records if r["event"] == "outer"}
        for f in ("", ".1"):
            state = load_checkpoint(out / "checkpoints" / f"{n}.safetensors{f}")
            assert tensors_hash(state["outer"]["anchor"]) == rounds[state["round"]]["weights_hash"], f
        start = next(r for r in records if r["event"] == "start")
        assert outer[-1]["val_loss"] < start["val_loss"] - 0.3
        assert outer[-1]["bytes_sent"] > 0 and outer[-1]["bytes_recv"] > 0
        assert records[-1]["event"] == "stop"  # clean shutdown: checkpoint written, DHT left
        assert records[-1]["dropped"] == {}  # signed messages all verified
        assert (out / "checkpoints" / f"{n}.safetensors").exists()
        written = json.loads((out / "config" / f"{n}.json").read_text())
        assert written["train"]["rounds"] == 0 and written["swarm"]["key"] == "<redacted>"
        assert group_members(pid) == []  # no orphan: DHT process, p2pd and reaper are gone
        charts = EventAccumulator(str(out / "tensorboard" / n))  # the TensorBoard copy of the records
        charts.Reload()
        assert [e.step for e in charts.Scalars("round/val_loss")][:4] == [r["step"] for r in outer]
    for rnd, hashes in _hashes_by_round(out, nodes).items():
        assert len(set(hashes.values())) == 1, f"round {rnd}: replicas differ: {hashes}"
    assert "total bytes exchanged" in procs.log("swarm")


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """One scrape of a node's /metrics, parsed by prometheus_client's own text parser:
    sample name -> {sorted labels: value}."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _check_live_metrics(early: dict, late: dict, node: str) -> None:
    one = lambda m, name, **labels: m[name][tuple(sorted(labels.items()))]  # noqa: E731
    assert one(late, "loco_node_info", node=node) == 1
    assert one(late, "loco_step") > one(early, "loco_step") > 0
    assert one(late, "loco_round") > one(early, "loco_round")
    assert one(late, "loco_rounds_total", status="ok") > one(early, "loco_rounds_total", status="ok") >= 1
    assert one(late, "loco_tokens_total") > one(early, "loco_tokens_total") > 0
    assert one(late, "loco_tokens_per_second") > 0 and one(late, "loco_loss") > 0 and one(late, "loco_val_loss") > 0
    assert one(late, "loco_group_size") == 3 and one(late, "loco_peers") == 2
    for kind in ("PART", "AVG"):  # the all-reduce's reduce-scatter and all-gather, both ways
        assert one(late, "loco_sent_bytes_total", kind=kind) > one(early, "loco_sent_bytes_total", kind=kind) > 0
        assert one(late, "loco_received_bytes_total", kind=kind) > 0
    parts = late["loco_round_part_seconds"]
    assert {dict(k)["part"] for k in parts} >= {"compute", "communication", "publish", "evaluation", "checkpoint"}
    assert sum(parts.values()) == pytest.approx(one(late, "loco_round_wall_seconds"), rel=0.02)
    assert sum(late["loco_dropped_messages_total"].values()) == 0  # (signed: all verified)


def _round_with_all(out: Path, nodes: list[str], after: int = -1) -> int | None:
    """A round (after ``after``) in which every node took part in the same group and holds
    the same weights (round 0 is one: compare with None)."""
    outer = {n: {r["round"]: r for r in _outer(out, n)} for n in nodes}
    for rnd in sorted(set().union(*outer.values())):
        recs = [outer[n].get(rnd) for n in nodes]
        if rnd > after and all(r and r["status"] == "ok" and r["group_size"] == len(nodes) for r in recs) \
                and len({r["weights_hash"] for r in recs}) == 1:
            return rnd
    return None


UNTIL_STOPPED = ("train.rounds=0", "swarm.wait_for_peers=1")


def test_restarts_resume_a_late_joiner_starts_from_swarm_state_and_all_rejoin_when_the_first_peer_is_gone(
        procs, tmp_path):
    out = tmp_path / "run"
    extra = UNTIL_STOPPED
    p0 = _start_node(procs, out, "node0", *extra)
    p1 = _start_node(procs, out, "node1", *extra, via_node0=True)
    peer = _ready(out, "node0")["join"]
    assert "dht: /ip4/127.0.0.1/tcp/" in procs.log("node0") and "zmq: tcp://127.0.0.1:" in procs.log("node0")
    restart1, late, again1 = (_staged_node(procs, out, n, *extra, peer=peer) for n in ("node1", "node2", "node1"))
    restart0 = _staged_node(procs, out, "node0", *extra)  # its own command: no token
    # 1. a restart resumes from its checkpoint
    wait_until(lambda: any(r["round"] >= 1 for r in _outer(out, "node1")), 240, "node1 to finish round 1")
    p1.send_signal(signal.SIGTERM)
    assert _wait_exit(p1, 120, "node1", procs) == 0
    stop = [r for r in read_records(out / "metrics" / "node1.jsonl") if r["event"] == "stop"][-1]
    p1 = restart1.go()
    starts = wait_until(lambda: [r for r in read_records(out / "metrics" / "node1.jsonl")
                                 if r["event"] == "start"][1:], 180, "node1 to restart")
    assert starts[0]["resumed"] is True
    assert starts[0]["step"] == stop["step"]  # continues from the checkpointed step
    # 2. a node that was never part of the swarm joins late, from the swarm's state
    wait_until(lambda: any(r["round"] >= 4 for r in _outer(out, "node0")), 300, "node0 to reach round 4")
    p2 = late.go()
    joined = wait_until(lambda: next((r for r in read_records(out / "metrics" / "node2.jsonl")
                                      if r["event"] == "start"), None), 180, "node2 to start")
    assert joined["round"] >= 4
    nodes = ["node0", "node1", "node2"]
    wait_until(lambda: _round_with_all(out, nodes) is not None, 300, "a round averaged by all three nodes")
    node0_after = {r["next_round"]: r for r in _outer(out, "node0")}
    source = node0_after[joined["round"]]
    assert joined["weights_hash"] == source["weights_hash"]  # starts from the swarm's weights
    first = next(r for r in read_records(out / "metrics" / "node0.jsonl") if r["event"] == "start")
    assert joined["val_loss"] < first["val_loss"] - 0.3  # not an untrained model
    assert abs(joined["val_loss"] - source["val_loss"]) < 1e-6
    # 3. the first node dies; node1 restarts with its own command, whose token names node0's
    # (dead) address: it finds the swarm through the peers it saw last time
    addr = _ready(out, "node0")["maddrs"]
    before = max(r["round"] for n in nodes for r in _outer(out, n))
    os.kill(p0.pid, signal.SIGKILL)
    p0.wait(timeout=30)
    p1.send_signal(signal.SIGTERM)
    assert _wait_exit(p1, 120, "node1", procs) == 0
    (out / "nodes" / "node0.json").unlink()
    p1 = again1.go()
    # then node0 restarts with its own command (no token, no peer): same multiaddress, and it
    # rejoins the swarm it led instead of starting a new one
    p0 = restart0.go()
    assert _ready(out, "node0")["maddrs"] == addr
    wait_until(lambda: _round_with_all(out, nodes, after=before) is not None, 300,
               "a round of all three after the restarts")
    for name, proc in (("node2", p2), ("node1", p1), ("node0", p0)):
        proc.send_signal(signal.SIGTERM)
        assert _wait_exit(proc, 120, name, procs) == 0


def test_unreachable_initial_peer_is_a_clear_error(procs, tmp_path):
    from loco.token import make_token

    dead = make_token("k", ["/ip4/127.0.0.1/tcp/9/p2p/12D3KooWAKJn9Ck2kVwPUXscWHyxGgFvq5jRnk3M18aRja12bKp7"])
    # (a few seconds of retries: an unreachable peer stays unreachable)
    p = _start_node(procs, tmp_path / "run", "node9", "swarm.bootstrap_timeout_s=3", peer=dead)
    assert _wait_exit(p, 180, "node9", procs) != 0
    log = procs.log("node9")
    assert "could not start the DHT node or reach initial peers" in log
    tried = re.search(r"\((\d+) attempts\)", log)  # it retried until swarm.bootstrap_timeout_s
    assert tried and int(tried.group(1)) >= 2, log[-2000:]
    assert "Traceback" not in log
    wait_until(lambda: group_members(p.pid) == [], 60, "node9's helpers to exit")


def test_the_fixture_reaps_a_launchers_nodes(procs, tmp_path):
    """A test that fails with a swarm running must not leave its nodes behind: they run in
    sessions of their own, outside the launcher's process group."""
    out = tmp_path / "run"
    procs.loco("swarm", "--nodes", "2", "--out", str(out), *_sets("train.rounds=0"), log="swarm")
    pids = [_ready(out, n)["pid"] for n in ("node0", "node1")]
    procs.reap()
    for pid in pids:
        wait_until(lambda pid=pid: group_members(pid) == [], 30, f"node {pid} and its helpers to be gone")


def test_a_checkpoint_that_does_not_fit_is_never_written_over_and_a_torn_one_falls_back(procs, tmp_path):
    out = tmp_path / "run"
    first = _start_node(procs, out, "node0", "train.rounds=1")
    cases = [("co2", ["optim.algorithm=co2"], "was written by algorithm 'diloco'"),
             ("shape", ["model.n_embd=32"], "does not fit this configuration")]
    starts = {name: _staged_node(procs, out, "node0", "train.rounds=2", *extra) for name, extra, _ in cases}
    # a second run resumes and writes again: the first run's newest file is then the
    # previous one (one run alone may write a single file: its writer keeps only the
    # newest state of those waiting for the disk)
    resumed = _staged_node(procs, out, "node0", "train.rounds=2")
    torn_start = _staged_node(procs, out, "node0", "train.rounds=2")
    assert _wait_exit(first, 240, "node0", procs) == 0
    assert _wait_exit(resumed.go(), 240, "node0", procs) == 0
    path = out / "checkpoints" / "node0.safetensors"
    assert previous(path, 1).exists()
    trained = path.read_bytes()
    stale = path.with_name("node0.safetensors.k1ll3d.tmp")  # a writer SIGKILLed mid-write
    stale.write_bytes(b"partial")
    for name, _, message in cases:
        p = starts[name].go()
        assert _wait_exit(p, 240, name, procs) != 0
        log = procs.log("node0")
        assert message in log and "Traceback" not in log, log[-2000:]
        assert path.read_bytes() == trained, f"{name}: the checkpoint was written over"
    assert not stale.exists()
    torn = trained[: len(trained) // 2]  # a disk that lost the end of the newest file
    path.write_bytes(torn)
    assert _wait_exit(torn_start.go(), 240, "torn", procs) == 0
    log = procs.log("node0")
    assert "cannot be read" in log and "resuming from node0.safetensors.1" in log, log[-3000:]
    aside = list(path.parent.glob("node0.safetensors.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == torn  # kept for a look, never written over
    assert "Traceback" not in log


def test_poison_is_never_applied_and_a_replica_that_hits_nan_restores_itself(procs, tmp_path):
    """node0 (the leader: smallest id) sends every contribution x1e6; node2's own weights go
    NaN once, mid-round. The honest replicas exclude node0's parts each round and keep
    training; node2 restores its last synchronized state and rejoins; nobody crashes, and
    no checkpoint ever holds NaN."""
    from loco.node.checkpoint import non_finite_entries

    out = tmp_path / "run"
    rounds = "train.rounds=6"
    common = ["node", "start", "--out", str(out), *_sets(rounds, "swarm.join_timeout_s=60")]
    faulty = "tests/loops/faulty_node.py"
    p0 = procs.python(faulty, "x1e6", *common, "--node-id", "node0", "--set", "swarm.wait_for_peers=2", log="node0")
    peer = _ready(out, "node0")["join"]
    assert "dht: /ip4/127.0.0.1/tcp/" in procs.log("node0") and "zmq: tcp://127.0.0.1:" in procs.log("node0")
    p1 = _start_node(procs, out, "node1", rounds, peer=peer)
    p2 = procs.python(faulty, "local_nan:20", *common, "--node-id", "node2", "--join", peer, log="node2")
    for name, p in (("node1", p1), ("node2", p2), ("node0", p0)):
        assert _wait_exit(p, 420, name, procs) == 0, procs.log(name)[-3000:]
    honest = _outer(out, "node1")
    start = next(r for r in read_records(out / "metrics" / "node1.jsonl") if r["event"] == "start")
    assert honest[-1]["val_loss"] < start["val_loss"] - 0.3, honest  # it trained
    ok = [r for r in honest if r["status"] == "ok" and r["group_size"] >= 2]
    assert len(ok) >= 3, honest
    assert any("node0" in r.get("suspects", []) for r in honest), honest
    for r in honest:
        assert r["val_loss"] < start["val_loss"] + 0.5, r  # never a poisoned update
    records2 = read_records(out / "metrics" / "node2.jsonl")
    assert any(r["event"] == "restored" for r in records2), records2
    assert _outer(out, "node2")[-1]["val_loss"] < start["val_loss"] - 0.3
    for n in ("node0", "node1", "node2"):
        state = load_checkpoint(out / "checkpoints" / f"{n}.safetensors", map_location="cpu")
        assert not non_finite_entries(state), n
        assert "Traceback" not in procs.log(n), procs.log(n)[-3000:]


@pytest.mark.parametrize("content, message", [
    (None, "did not appear within swarm.join_timeout_s=2s"),
    ("{not json", "not a node's info file"),
    ('{"pid": 1}', "neither a join token nor DHT addresses"),
])
def test_join_file_that_never_comes_or_is_not_a_nodes_info_is_a_clear_error(tmp_path, content, message):
    from click.testing import CliRunner

    from loco.node.cli import main

    info = tmp_path / "node0.json"
    if content is not None:
        info.write_text(content)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # (in this process: `node start` installs its stop handlers)
        result = CliRunner().invoke(main, ["node", "start", "--out", str(tmp_path / "run"), "--node-id", "node1",
                                           "--join-file", str(info), *_sets("swarm.join_timeout_s=2")])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "run" / "checkpoints" / "node1.safetensors").exists()  # it never trained
