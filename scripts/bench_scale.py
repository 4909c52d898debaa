"""Swarms of real node processes at growing sizes: DiLoCo's all-reduce vs NoLoCo's gossip.

For each algorithm and node count this runs ``loco swarm`` (real processes, a real
hivemind DHT, ZeroMQ over 127.0.0.1, optionally an emulated network in each node's
transport) with a small model and one torch thread per node, then reads the nodes' JSONL
records. The point is the protocols, not the arithmetic: on a 2-core machine 32 nodes share
two cores, so compute per round grows with the node count; compare the communication
columns, which do not share the cores' time in the same way.

Columns (medians over every node's rounds after the first, unless said):
  join_s      from the first node's start record to the last node's (the DHT holds: every
              node found the swarm)
  round_s     wall time between a node's consecutive outer records
  comm_s      time training was blocked on the outer step (all-reduce or gossip)
  match_s / data_s / commit_s   DiLoCo: the all-reduce's split (matchmaking, reduce-scatter +
              all-gather, commit step)
  MB/round    bytes a node sent per round (counted at the socket)
  ok          rounds that averaged with someone / all rounds (NoLoCo: exchanges that happened)
  whole       DiLoCo: ok rounds whose group was the whole swarm
  agree       DiLoCo: rounds where every member reported the same weights hash
  stalls      rounds whose exchange/all-reduce waited ≥ 90% of its timeout
  val         mean final validation loss over the nodes

    python scripts/bench_scale.py --nodes 4,8,16,32 --algorithms diloco,noloco \
        --rounds 6 --bandwidth 100mbit --latency-ms 50
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _records(out: Path) -> dict[str, list[dict]]:
    by_node = {}
    for f in sorted((out / "metrics").glob("*.jsonl")):
        by_node[f.stem] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return by_node


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(out: Path, nodes: int, timeout_s: float) -> dict[str, float]:
    """The table's columns for one finished run (see the module docstring)."""
    recs = _records(out)
    starts = [r["time"] for rs in recs.values() for r in rs if r["event"] == "start"]
    outer = {n: [r for r in rs if r["event"] == "outer"] for n, rs in recs.items()}
    steady = [r for rs in outer.values() for r in rs[1:]]
    every = [r for rs in outer.values() for r in rs]
    round_s = [b["time"] - a["time"] for rs in outer.values() for a, b in zip(rs[1:], rs[2:], strict=False)]
    hashes: dict[int, set[str]] = defaultdict(set)
    for r in every:
        if r["status"] == "ok" and r.get("group_size", 0) > 1:
            hashes[r["round"]].add(r["weights_hash"])
    waited = [r.get("exchange_s", r.get("comm_s", 0.0)) for r in every]
    finals = [rs[-1]["val_loss"] for rs in outer.values() if rs]
    ok = [r for r in every if r["status"] == "ok" and r.get("group_size", 0) > 1]
    collective = any("matchmaking_s" in r for r in every)  # replicas meant to be identical
    return {
        "nodes_seen": len(starts),
        "join_s": max(starts) - min(starts) if starts else float("nan"),
        "round_s": _median(round_s),
        "comm_s": _median([r["comm_s"] for r in steady]),
        "match_s": _median([r["matchmaking_s"] for r in steady if "matchmaking_s" in r]),
        "data_s": _median([r["data_s"] for r in steady if "data_s" in r]),
        "commit_s": _median([r["commit_s"] for r in steady if "commit_s" in r]),
        "mb_round": _median([r["round_bytes"] / 1e6 for r in steady]),
        "ok": len(ok) / max(1, len(every)),
        "whole": sum(r["group_size"] == nodes for r in ok) / max(1, len(ok)) if collective else float("nan"),
        "agree": sum(len(h) == 1 for h in hashes.values()) / max(1, len(hashes)) if collective else float("nan"),
        "stalls": sum(w >= 0.9 * timeout_s for w in waited),
        "val": statistics.mean(finals) if finals else float("nan"),
        "rounds": len(every),
    }


def run_swarm(out: Path, nodes: int, algorithm: str, args: argparse.Namespace) -> int:
    sets = [
        f"optim.algorithm='{algorithm}'", f"optim.inner_steps={args.inner_steps}", f"train.rounds={args.rounds}",
        "model.preset='tiny'", "node.threads=1", "data.batch_size=8", "data.val_batches=1",
        f"train.checkpoint_every={args.rounds + 1}",  # no checkpoint inside the measured rounds
        f"optim.noloco.exchange_timeout_s={args.timeout_s}",
    ]
    if args.bandwidth:
        sets.append(f"network.bandwidth='{args.bandwidth}'")
    if args.latency_ms:
        sets.append(f"network.latency_ms={args.latency_ms}")
    cmd = [sys.executable, "-m", "loco.node.cli", "swarm", "--nodes", str(nodes), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=args.run_timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # the swarm stops its nodes cleanly
            try:
                return proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                return proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="4,8,16")
    ap.add_argument("--algorithms", default="diloco,noloco")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--bandwidth", default="", help="emulated uplink per node, e.g. 100mbit (default: none)")
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--timeout-s", type=float, default=30.0, help="NoLoCo's exchange timeout")
    ap.add_argument("--run-timeout-s", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=Path("runs") / f"scale-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {os.cpu_count()} cores; network: {args.bandwidth or 'unlimited'}, {args.latency_ms:g} ms; "
          f"{args.rounds} rounds of {args.inner_steps} steps; runs under {args.out}")
    cols = ["join_s", "round_s", "comm_s", "match_s", "data_s", "commit_s", "mb_round", "ok", "whole", "agree",
            "stalls", "val"]
    print(f"{'algorithm':>9} {'nodes':>5} {'exit':>4} " + " ".join(f"{c:>8}" for c in cols), flush=True)
    for n in (int(x) for x in args.nodes.split(",")):
        for algorithm in args.algorithms.split(","):
            out = args.out / f"{algorithm}-{n}"
            if out.exists():  # its nodes would resume from the checkpoints there: not a fresh measurement
                sys.exit(f"{out} exists (an earlier run): give --out a new folder")
            code = run_swarm(out, n, algorithm, args)
            s = summarize(out, n, args.timeout_s)
            print(f"{algorithm:>9} {n:>5} {code:>4} " + " ".join(
                f"{s[c]:>8.0f}" if c == "stalls" else f"{s[c]:>8.3f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
