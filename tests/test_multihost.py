"""The multi-host path on every CI run: three nodes in three network namespaces, each with
its own address on a bridge (as three machines, or three containers of the compose file,
would be), listening on all interfaces and announcing their own address by name, joining
through the join token the first one printed before it started (`--print-join-token`).
Needs root (skipped with the reason otherwise)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from loco.token import parse_token
from tests.conftest import FAST, read_records, wait_until

pytestmark = pytest.mark.swarm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.netns import Namespaces  # noqa: E402


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    probe = f"lp{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def test_three_nodes_in_three_namespaces_join_by_token_and_announced_names_and_agree(procs, tmp_path):
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    tag = os.getpid() % 10000
    out = tmp_path / "run"
    sets = [arg for item in [*FAST, "train.rounds=3", "swarm.wait_for_peers=2"] for arg in ("--set", item)]
    with Namespaces(3, prefix=f"lh{tag}n", subnet=f"10.{233 + tag % 20}.{tag % 250}", hosts=True,
                    handle_sigterm=False) as ns:

        def start(i: int, *extra: str):
            # every node binds all interfaces and announces its name (resolved in its namespace)
            return procs.python("-m", "loco.node.cli", "node", "start", "--out", str(out / f"node{i}"),
                                "--node-id", f"node{i}", "--listen", "0.0.0.0", "--announce", f"node{i}",
                                *sets, *extra, log=f"node{i}", prefix=tuple(ns.command(i, [])))

        # the first node's token, printed before it starts (its identity and ports are fixed
        # under its --out), is what an operator hands to the other machines
        printed = subprocess.run([*ns.command(0, []), sys.executable, "-m", "loco.node.cli", "node", "start",
                                  "--out", str(out / "node0"), "--node-id", "node0", "--listen", "0.0.0.0",
                                  "--announce", "node0", "--dht-port", "7010", "--print-join-token", *sets],
                                 capture_output=True, text=True, timeout=120)
        assert printed.returncode == 0, printed.stderr[-2000:]
        token = printed.stdout.strip()
        # all three at once: the joiners keep trying the first node's address until it is up
        nodes = [start(0, "--dht-port", "7010"), *(start(i, "--join", token) for i in (1, 2))]
        printed_at_start = wait_until(lambda: re.search(r"join: loco node start --join (\S+)", procs.log("node0")),
                                      180, "node0's join token").group(1)
        assert parse_token(printed_at_start)[0] == parse_token(token)[0]  # the same swarm key
        assert parse_token(token)[1][0] in parse_token(printed_at_start)[1]  # and the same address
        for i, p in enumerate(nodes):
            try:
                assert p.wait(timeout=420) == 0, procs.log(f"node{i}")[-3000:]
            except subprocess.TimeoutExpired:
                raise AssertionError(f"node{i} did not finish: {procs.log(f'node{i}')[-3000:]}") from None
        hashes: dict[int, set[str]] = defaultdict(set)
        for i in range(3):
            records = read_records(out / f"node{i}" / "metrics" / f"node{i}.jsonl")
            start_record = next(r for r in records if r["event"] == "start")
            assert start_record["endpoint"].startswith(f"tcp://{ns.address(i)}:")  # its own address, not 127.0.0.1
            outer = [r for r in records if r["event"] == "outer"]
            assert [r["round"] for r in outer] == [0, 1, 2]
            assert all(r["status"] == "ok" and r["group_size"] == 3 for r in outer), outer
            for r in outer:
                hashes[r["round"]].add(r["weights_hash"])
            assert records[-1]["event"] == "stop" and records[-1]["dropped"] == {}
        assert all(len(h) == 1 for h in hashes.values()), hashes
