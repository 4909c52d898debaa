"""Poisoned contributions vs a fault-free run: real node processes on 127.0.0.1.

    python scripts/bench_faults.py [--rounds 12] [--nodes 3]

Each scenario starts ``--nodes`` daemons (the same seeds and config each time) and trains
``--rounds`` DiLoCo rounds. In the faulty scenarios one node runs tests/loops/faulty_node.py:
node0 (the leader, by id) or the last node (a follower) sends every contribution x1e6, as a
constant 1e3, or as NaN; or the last node's own weights go NaN once mid-run. Prints, per
scenario, the honest nodes' final validation loss against the fault-free run's, the rounds
they averaged in a group, how often the poisoner was named a suspect, and whether any
checkpoint holds NaN.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.n_layer=1", "model.n_embd=64", "model.n_head=4", "model.block_size=64", "data.batch_size=8",
        "data.max_bytes=1500000", "data.val_batches=4", "optim.inner_steps=8", "optim.warmup_steps=0",
        "optim.inner_lr=0.003", "node.threads=1", "swarm.announce_ttl_s=4"]


def _records(out: Path, node: str) -> list[dict]:
    path = out / "metrics" / f"{node}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(scenario: str, fault_node: int, fault: str | None, nodes: int, rounds: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"loco-faults-{scenario}-"))
    sets = [x for item in [*FAST, f"train.rounds={rounds}", f"swarm.wait_for_peers={nodes - 1}"]
            for x in ("--set", item)]
    procs = []
    env = {**os.environ, "LOCO_SWARM_KEY": "bench-faults"}
    start = time.monotonic()
    try:
        for i in range(nodes):
            cmd = [sys.executable, "-m", "loco.node.cli"]
            if fault is not None and i == fault_node:
                cmd = [sys.executable, str(ROOT / "tests" / "loops" / "faulty_node.py"), fault]
            cmd += ["node", "start", "--out", str(out), "--node-id", f"node{i}", *sets]
            if i > 0:
                info = out / "nodes" / "node0.json"
                while not info.exists():
                    time.sleep(0.2)
                cmd += ["--initial-peer", json.loads(info.read_text())["maddrs"][0]]
            log = (out / f"node{i}.log").open("wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                          start_new_session=True))
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    honest = [f"node{i}" for i in range(nodes) if fault is None or i != fault_node or fault.startswith("local")]
    finals, grouped, named = [], 0, 0
    for n in honest:
        outer = [r for r in _records(out, n) if r["event"] == "outer"]
        finals.append(outer[-1]["val_loss"])
        grouped += sum(1 for r in outer if r["status"] == "ok" and r["group_size"] >= 2)
        named += sum(1 for r in outer if f"node{fault_node}" in r.get("suspects", []))
    from loco.node.checkpoint import load_checkpoint, non_finite_entries

    nan_ckpts = sum(bool(non_finite_entries(load_checkpoint(out / "checkpoints" / f"node{i}.safetensors")))
                    for i in range(nodes) if (out / "checkpoints" / f"node{i}.safetensors").exists())
    return {"scenario": scenario, "exit": codes, "final_val": sum(finals) / len(finals), "grouped": grouped,
            "named": named, "nan_checkpoints": nan_ckpts, "wall_s": time.monotonic() - start, "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--nodes", type=int, default=3)
    args = ap.parse_args()
    last = args.nodes - 1
    scenarios = [("fault-free", 0, None), ("leader x1e6", 0, "x1e6"), ("leader const 1e3", 0, "const1e3"),
                 ("follower NaN", last, "nan"), ("follower Inf", last, "inf"),
                 ("own weights NaN once", last, f"local_nan:{4 * 8 + 3}")]
    rows = [run(name, node, fault, args.nodes, args.rounds) for name, node, fault in scenarios]
    base = rows[0]["final_val"]
    print(f"{'scenario':<22} {'exit codes':<12} {'honest val':>10} {'vs clean':>9} {'grouped':>8} {'named':>6} "
          f"{'NaN ckpt':>9} {'wall s':>7}")
    for r in rows:
        print(f"{r['scenario']:<22} {str(r['exit']):<12} {r['final_val']:>10.4f} {r['final_val'] / base:>9.3f} "
              f"{r['grouped']:>8} {r['named']:>6} {r['nan_checkpoints']:>9} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
