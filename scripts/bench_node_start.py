"""How long a launcher takes to bring N node processes up on one machine, when each starts
as a fresh interpreter (the baseline: what ``loco swarm`` did before, and what any script
that runs ``python -m loco.node.cli node start`` N times does) vs when each is forked from
one fork server that imported torch, hivemind and loco once (``loco swarm`` and ``loco run``
now; the fork server's own start is counted).

A node is ready when it wrote its ``start`` record: it has built its model and optimizer,
joined the swarm (every node waits for the others, node1… join through node0's file, as
``loco swarm`` starts them) and evaluated once. ``ready_s``: from the launch until every
node is ready; ``cpu_s``: the CPU seconds the node processes and the fork server had used
by then (user + system, from /proc). The nodes are then stopped (SIGTERM) and reaped.

    python scripts/bench_node_start.py [--nodes 2 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loco.node.prefork import ForkServer
from loco.node.swarm import node_command, spawn
from loco.token import new_key

SETTINGS = ["model.n_layer=1", "model.n_embd=64", "model.n_head=4", "model.block_size=64", "data.batch_size=8",
            "data.max_bytes=1500000", "data.val_batches=2", "node.threads=1", "train.rounds=0",
            "swarm.announce_ttl_s=4"]
TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and the children it reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / TICKS  # utime, stime, cutime, cstime


def _started(metrics: Path) -> bool:
    return metrics.exists() and '"event": "start"' in metrics.read_text()


def start_nodes(n: int, forked: bool) -> tuple[float, float]:
    """(ready_s, cpu_s) of ``n`` nodes started fresh or forked."""
    env = {**os.environ, "LOCO_SWARM_KEY": new_key()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t0 = time.monotonic()
        forks = ForkServer() if forked else None
        first = out / "nodes" / "node0.json"
        procs = []
        try:
            for i in range(n):
                cmd = node_command(f"node{i}", out, None, [*SETTINGS, f"swarm.wait_for_peers={n - 1}"], None,
                                   first if i else None)
                procs.append(spawn(cmd, out / "logs" / f"node{i}.log", env, forks))
            while not all(_started(out / "metrics" / f"node{i}.jsonl") for i in range(n)):
                dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                if dead:
                    log = (out / "logs" / f"node{dead[0]}.log").read_text()[-2000:]
                    raise RuntimeError(f"node{dead[0]} exited before it was ready:\n{log}")
                time.sleep(0.05)
            up = time.monotonic() - t0
            cpu = sum(_cpu_s(p.pid) for p in procs) + (_cpu_s(forks.pid) if forks else 0.0)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
            if forks is not None:
                forks.close()
    return up, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=1, help="runs of each (the median is shown)")
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"node start: {os.cpu_count()} cores, commit {commit}, {datetime.date.today()}")
    print(f"{'nodes':>5}  {'fresh ready_s':>13}  {'forked ready_s':>14}  {'ratio':>5}  {'fresh cpu_s':>11}  "
          f"{'forked cpu_s':>12}  {'ratio':>5}")
    for n in args.nodes:
        fresh = [start_nodes(n, False) for _ in range(args.repeats)]
        forked = [start_nodes(n, True) for _ in range(args.repeats)]
        fu, fc = statistics.median(x[0] for x in fresh), statistics.median(x[1] for x in fresh)
        ku, kc = statistics.median(x[0] for x in forked), statistics.median(x[1] for x in forked)
        print(f"{n:>5}  {fu:>13.1f}  {ku:>14.1f}  {ku / fu:>5.2f}  {fc:>11.1f}  {kc:>12.1f}  {kc / fc:>5.2f}",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
