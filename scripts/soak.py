"""Kill storm: SIGKILL and restart daemons of a running swarm, again and again.

    python scripts/soak.py [--nodes 4] [--kills 50] [--every-s 6] [--seed 0]

Starts ``--nodes`` daemons (DiLoCo, a small model, a swarm key) and, every ``--every-s``
seconds, SIGKILLs one node's process at random (never its helpers: the node's reaper must
end its DHT process and p2pd) and restarts it at once with the same command (same
``--out`` and id: it resumes from its checkpoint and rejoins through the peers it knew).
After the last kill, it waits until every node has averaged a few rounds with the whole
swarm again, stops them all (SIGTERM) and runs a fault-free swarm for as many rounds.

Prints: kills survived, orphan processes left by a killed node (its process group not
empty 15 s after the kill), restarts that exited with an error, rounds, the longest time
a round kept a node from training (``comm_s``), rounds in which the swarm was split (ok
rounds of several members with different hashes), how long the swarm took to be whole
again after the last kill, and the final validation loss against the fault-free run's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.n_layer=1", "model.n_embd=64", "model.n_head=4", "model.block_size=64", "data.batch_size=8",
        "data.max_bytes=1500000", "data.val_batches=4", "optim.inner_steps=8", "optim.warmup_steps=0",
        "optim.inner_lr=0.003", "node.threads=1", "swarm.announce_ttl_s=4",
        "collective.matchmaking_timeout_s=10", "collective.allreduce_timeout_s=10", "collective.decision_timeout_s=10"]
ENV = {**os.environ, "LOCO_SWARM_KEY": "soak"}


def _records(out: Path, node: str) -> list[dict]:
    path = out / "metrics" / f"{node}.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
    return records


def _outer(out: Path, node: str) -> list[dict]:
    return [r for r in _records(out, node) if r["event"] == "outer"]


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


def _describe(pid: int) -> str:
    """``pid`` and its command line (shortened), for naming what a kill left behind."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "(gone)"
    return f"{pid} {cmd[:100]}"


class Swarm:
    def __init__(self, out: Path, nodes: int, extra: list[str]):
        self.out, self.n = out, nodes
        self.sets = [x for item in [*FAST, *extra] for x in ("--set", item)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.peer = ""

    def start(self, i: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "loco.node.cli", "node", "start", "--out", str(self.out), "--node-id", f"node{i}",
               *self.sets]
        if self.peer and i > 0:
            cmd += ["--initial-peer", self.peer]
        log = (self.out / f"node{i}.log").open("ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV, start_new_session=True)
        self.procs[i] = p
        return p

    def start_all(self) -> None:
        self.start(0)
        info = self.out / "nodes" / "node0.json"
        deadline = time.monotonic() + 120
        while not info.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("node0 did not start in 120 s")
            time.sleep(0.2)
        self.peer = json.loads(info.read_text())["maddrs"][0]
        for i in range(1, self.n):
            self.start(i)

    def stop_all(self, timeout_s: float = 120) -> list[int | None]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs.values():
            try:
                codes.append(p.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                codes.append(None)
        self.reap()
        return codes

    def reap(self) -> None:
        for p in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)


def _whole(out: Path, nodes: int, since: float, rounds: int) -> bool:
    """Every node has averaged ``rounds`` rounds with all ``nodes`` members since ``since``."""
    return all(sum(r["status"] == "ok" and r["group_size"] == nodes and r["time"] > since
                   for r in _outer(out, f"node{i}")) >= rounds for i in range(nodes))


def storm(args: argparse.Namespace) -> dict:
    out = Path(tempfile.mkdtemp(prefix="loco-soak-"))
    swarm = Swarm(out, args.nodes, ["train.rounds=0", f"swarm.wait_for_peers={args.nodes - 1}"])
    rng = random.Random(args.seed)
    orphans, failed_restarts, kills = 0, 0, 0
    try:
        swarm.start_all()
        deadline = time.monotonic() + 300
        while not _whole(out, args.nodes, 0, 2):
            if time.monotonic() > deadline:
                raise RuntimeError("the swarm never formed")
            time.sleep(0.5)
        for k in range(args.kills):
            time.sleep(args.every_s)
            i = rng.randrange(args.nodes)
            old = swarm.procs[i]
            if old.poll() is not None:  # it exited on its own: an error
                failed_restarts += 1
            else:
                os.kill(old.pid, signal.SIGKILL)  # the node only: its reaper must end the rest
                old.wait()
            kills += 1
            t_kill = time.monotonic()
            while _group_alive(old.pid) and time.monotonic() - t_kill < 15:
                time.sleep(0.2)
            left = _group_alive(old.pid)
            if left:
                orphans += len(left)
                print(f"  left in node{i}'s group 15 s after the kill: {[_describe(p) for p in left]}", flush=True)
                os.killpg(old.pid, signal.SIGKILL)
            swarm.start(i)
            print(f"kill {k + 1}/{args.kills}: node{i}", flush=True)
        last_kill = time.time()
        t0 = time.monotonic()
        deadline = t0 + 600
        while not _whole(out, args.nodes, last_kill, 3) and time.monotonic() < deadline:
            time.sleep(0.5)
        whole_after_s = time.monotonic() - t0 if _whole(out, args.nodes, last_kill, 3) else None
        codes = swarm.stop_all()
    finally:
        swarm.reap()
    per_round: dict[int, set[str]] = defaultdict(set)
    longest, last_rounds, finals = 0.0, [], []
    for i in range(args.nodes):
        outer = _outer(out, f"node{i}")
        last_rounds.append(outer[-1]["round"])
        finals.append(outer[-1]["val_loss"])
        longest = max([longest, *(r["comm_s"] for r in outer)])
        for r in outer:
            if r["status"] == "ok" and r["group_size"] >= 2:
                per_round[r["round"]].add(r["weights_hash"])
    return {"out": str(out), "kills": kills, "orphans": orphans, "failed_restarts": failed_restarts,
            "stop_codes": codes, "rounds": min(last_rounds) + 1, "longest_blocked_s": longest,
            "split_rounds": sum(len(h) > 1 for h in per_round.values()), "whole_after_s": whole_after_s,
            "final_val": sum(finals) / len(finals)}


def fault_free(args: argparse.Namespace, rounds: int) -> float:
    out = Path(tempfile.mkdtemp(prefix="loco-soak-clean-"))
    swarm = Swarm(out, args.nodes, [f"train.rounds={rounds}", f"swarm.wait_for_peers={args.nodes - 1}"])
    try:
        swarm.start_all()
        for p in swarm.procs.values():
            p.wait(timeout=1800)
    finally:
        swarm.reap()
    finals = [_outer(out, f"node{i}")[-1]["val_loss"] for i in range(args.nodes)]
    return sum(finals) / len(finals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--every-s", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.monotonic()
    s = storm(args)
    clean = fault_free(args, s["rounds"])
    print(f"\n{'nodes':>5} {'kills':>5} {'orphans':>7} {'failed':>6} {'stop codes':<14} {'rounds':>6} "
          f"{'longest blocked s':>17} {'split rounds':>12} {'whole again s':>13} {'val':>7} {'fault-free':>10} "
          f"{'ratio':>6}")
    whole = f"{s['whole_after_s']:.1f}" if s["whole_after_s"] is not None else "never"
    print(f"{args.nodes:>5} {s['kills']:>5} {s['orphans']:>7} {s['failed_restarts']:>6} {str(s['stop_codes']):<14} "
          f"{s['rounds']:>6} {s['longest_blocked_s']:>17.1f} {s['split_rounds']:>12} {whole:>13} "
          f"{s['final_val']:>7.4f} {clean:>10.4f} {s['final_val'] / clean:>6.3f}")
    print(f"(run folder {s['out']}; {time.monotonic() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
