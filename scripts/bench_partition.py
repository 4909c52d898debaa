"""A frozen node and a network partition, in a real 4-node swarm: does the swarm stay consistent?

    python scripts/bench_partition.py [--config configs/partition.toml] [--out DIR]

Runs the experiment in ``--config`` with ``loco run`` (real node processes on 127.0.0.1:
node3 is SIGSTOPped for longer than a round's timeouts, then the swarm is cut into
{node0, node1} | {node2, node3} and healed), then reads every node's metrics and prints:

- while node3 is frozen: the rounds the others committed, and any committed alone (``ok``
  with a group of one), which must be none;
- during the partition: the rounds each side committed (both must train) and whether the
  members of each round's group agree on the weights;
- after the heal: how many seconds, and how many rounds of each node, until all four
  average together with one weights hash (passes if no node needs more than 3);
- over the whole run: rounds whose group members report different hashes (must be none).

Exits 1 if any of these fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _records(folder: Path) -> tuple[dict[str, list[dict]], list[dict]]:
    nodes: dict[str, list[dict]] = {}
    for path in sorted((folder / "metrics").glob("node*.jsonl")):
        nodes[path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    faults = [json.loads(line) for line in (folder / "metrics" / "faults.jsonl").read_text().splitlines()]
    return nodes, faults


def _outer(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == "outer"]


def analyse(folder: Path, cut_s: float) -> dict:
    nodes, faults = _records(folder)
    unfired = [f for f in faults if f.get("fired") is False]
    if unfired:
        raise SystemExit(f"faults that never fired (the run ended first): {unfired}")
    pause = next(f for f in faults if f.get("action") == "pause")
    resume = next(f for f in faults if f.get("action") == "resume")
    cut = next(f for f in faults if f.get("action") == "cut")
    frozen = pause["target"]
    p0, p1 = pause["time"], resume["time"]
    c0, c1 = cut["time"], cut["time"] + cut_s
    out: dict = {}

    during_pause = {n: [r for r in _outer(rs) if p0 <= r["time"] <= p1] for n, rs in nodes.items() if n != frozen}
    out["pause_s"] = p1 - p0
    out["pause_ok_rounds"] = {n: sum(r["status"] == "ok" for r in rs) for n, rs in during_pause.items()}
    out["pause_solo_ok"] = sum(r["status"] == "ok" and r["group_size"] == 1 for rs in during_pause.values() for r in rs)

    sides = [["node0", "node1"], ["node2", "node3"]]
    out["cut_s"] = cut_s
    out["cut_ok_rounds"] = {}
    for side in sides:
        # a round committed by this side during the cut: ok, and its group within the side
        rounds = {r["round"] for n in side for r in _outer(nodes[n])
                  if c0 <= r["time"] <= c1 and r["status"] == "ok" and r["group_size"] == len(side)}
        out["cut_ok_rounds"]["|".join(side)] = len(rounds)

    everyone = sorted(nodes)
    whole = None
    after = defaultdict(dict)
    for n in everyone:
        for r in _outer(nodes[n]):
            if r["time"] > c1:
                after[r["round"]][n] = r
    for rnd in sorted(after):
        recs = after[rnd]
        if len(recs) == len(everyone) and all(r["status"] == "ok" and r["group_size"] == len(everyone)
                                              for r in recs.values()) \
                and len({r["weights_hash"] for r in recs.values()}) == 1:
            whole = max(r["time"] for r in recs.values())
            break
    # each node's own rounds (any status) between the heal and the first whole round, that one
    # included: the side that rejoins counts its catch-up; the other side may run quick rounds
    out["heal_rounds"] = None if whole is None else {
        n: sum(1 for r in _outer(nodes[n]) if c1 < r["time"] <= whole) for n in everyone}
    out["heal_s"] = None if whole is None else whole - c1

    # a group of several members must agree: same round, same group size, different hashes
    # within one side is a split (the two sides of the cut legitimately differ)
    split = 0
    by_round: dict[int, dict[str, dict]] = defaultdict(dict)
    for n in everyone:
        for r in _outer(nodes[n]):
            if r["status"] == "ok" and r["group_size"] >= 2:
                by_round[r["round"]][n] = r
    for recs in by_round.values():
        groups: dict[int, set[str]] = defaultdict(set)
        for r in recs.values():
            groups[r["group_size"]].add(r["weights_hash"])
        split += sum(len(h) > 1 for size, h in groups.items() if size > len(everyone) // 2)
    out["split_rounds"] = split
    out["rounds"] = {n: len(_outer(rs)) for n, rs in nodes.items()}
    out["final_val_loss"] = {n: next((r["val_loss"] for r in reversed(_outer(rs)) if r.get("val_loss") is not None),
                                     None) for n, rs in nodes.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "partition.toml"))
    ap.add_argument("--out", default=None, help="report folder (default: a new temp folder)")
    args = ap.parse_args()
    exp = tomllib.loads(Path(args.config).read_text())
    cut_s = next(f["duration_s"] for f in exp["fault"] if f["action"] == "cut")
    out = Path(args.out or tempfile.mkdtemp(prefix="loco-partition-"))
    subprocess.run([sys.executable, "-m", "loco.node.cli", "run", args.config, "--out", str(out)], check=True, cwd=ROOT)
    variant = exp["variant"][0]["name"]
    result = analyse(out / variant, cut_s)
    print(f"\nfolder: {out / variant}")
    print("| measure | value |\n|---|---|")
    print(f"| node3 frozen (SIGSTOP) | {result['pause_s']:.0f} s |")
    print(f"| rounds the others committed meanwhile | {result['pause_ok_rounds']} |")
    print(f"| rounds committed alone (ok, group of 1) meanwhile | {result['pause_solo_ok']} |")
    print(f"| partition {{node0,node1}} \\| {{node2,node3}} | {result['cut_s']:.0f} s |")
    print(f"| rounds each side committed during it | {result['cut_ok_rounds']} |")
    print(f"| rounds after the heal until all 4 average with one hash, per node | {result['heal_rounds']} "
          f"({result['heal_s'] if result['heal_s'] is None else round(result['heal_s'], 1)} s) |")
    print(f"| rounds whose group disagreed on the weights | {result['split_rounds']} |")
    print(f"| rounds per node | {result['rounds']} |")
    print(f"| final validation loss | {result['final_val_loss']} |")
    good = (result["pause_solo_ok"] == 0 and all(v > 0 for v in result["pause_ok_rounds"].values()) and all(v > 0 for v in result["cut_ok_rounds"].values())
            and result["heal_rounds"] is not None and max(result["heal_rounds"].values()) <= 3
            and result["split_rounds"] == 0)
    print("PASS" if good else "FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
