"""SkipPipe's throughput model in a paper-like setting: iteration time of the full pipeline,
random valid skip paths, and scheduled paths (protocols/pipeline/schedule.py).

Setting (docs/ALGORITHMS.md section 5): 20 nodes in 12 cloud regions, 6 stages, at most 3
microbatches in flight per node, 33% skip (a path visits 4 of 6 stages), swaps allowed.

Latency matrix: derived from the regions' public coordinates with the usual fiber model:
one-way latency = great-circle distance / (2/3 of c) × 1.5 route stretch + 1 ms (0.5 ms
inside a region). Bandwidth: 10 Gbit/s inside a region, 1 Gbit/s between regions closer
than 3000 km, 500 Mbit/s farther. Compute: ``--layer-s`` seconds of forward per stage and
microbatch at speed 1 (backward 1.5x); node speeds drawn in [0.5, 1.5] (mixed GPUs).

    python scripts/sim_skippipe.py [--microbatches 24] [--activation-mb 16] [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loco.protocols.pipeline.schedule import (  # noqa: E402
    PipeNode,
    Setting,
    assign_stages,
    full_pipeline,
    random_paths,
    schedule,
    simulate,
)

REGIONS = {  # (latitude, longitude) of the cities hosting these cloud regions
    "us-east (Virginia)": (38.9, -77.0), "us-west (Oregon)": (45.6, -121.2),
    "ca-central (Montreal)": (45.5, -73.6), "sa-east (Sao Paulo)": (-23.5, -46.6),
    "eu-west (Dublin)": (53.3, -6.3), "eu-central (Frankfurt)": (50.1, 8.7),
    "eu-north (Stockholm)": (59.3, 18.1), "ap-south (Mumbai)": (19.1, 72.9),
    "ap-southeast (Singapore)": (1.35, 103.8), "ap-northeast (Tokyo)": (35.7, 139.7),
    "ap-southeast-2 (Sydney)": (-33.9, 151.2), "af-south (Cape Town)": (-33.9, 18.4),
}


def great_circle_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371 * math.asin(math.sqrt(h))


def one_way_s(a: str, b: str) -> float:
    if a == b:
        return 0.0005
    return great_circle_km(REGIONS[a], REGIONS[b]) / 200_000 * 1.5 + 0.001


def paper_setting(microbatches: int, activation_mb: float, layer_s: float, seed: int = 0) -> Setting:
    rng = random.Random(seed)
    regions = list(REGIONS)
    homes = [regions[i % len(regions)] for i in range(20)]  # 12 regions, 8 of them with 2 nodes
    stage_of = [i % 6 for i in range(20)]  # stages 0 and 1 get 4 nodes, the others 3
    nodes = [PipeNode(f"n{i:02d}", stage_of[i], speed=rng.uniform(0.5, 1.5), memory=3) for i in range(20)]
    region = {n.id: homes[i] for i, n in enumerate(nodes)}
    latency, bandwidth = {}, {}
    for a in nodes:
        for b in nodes:
            if a.id == b.id:
                continue
            ra, rb = region[a.id], region[b.id]
            latency[(a.id, b.id)] = one_way_s(ra, rb)
            km = great_circle_km(REGIONS[ra], REGIONS[rb])
            bandwidth[(a.id, b.id)] = (10e9 if ra == rb else 1e9 if km < 3000 else 0.5e9) / 8
    return Setting(6, nodes, microbatches, skip=0.33, latency_s=latency, bandwidth_bps=bandwidth,
                   activation_bytes=activation_mb * 1e6, layer_s=layer_s, swaps=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--microbatches", type=int, default=24)
    ap.add_argument("--activation-mb", type=float, default=16.0)
    ap.add_argument("--layer-s", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--assign", action="store_true",
                    help="also place nodes on stages by local search (slow: ~1 min per seed)")
    args = ap.parse_args()
    rows = []
    for seed in range(args.seeds):
        st = paper_setting(args.microbatches, args.activation_mb, args.layer_s, seed)
        full = simulate(st, full_pipeline(st)).makespan
        rnd = simulate(st, random_paths(st, random.Random(seed))).makespan
        ours = simulate(st, schedule(st, seed=seed)).makespan
        placed = ours
        if args.assign:
            moved = assign_stages(st, passes=1, seed=seed)
            placed = simulate(moved, schedule(moved, seed=seed)).makespan
        rows.append((full, rnd, ours, placed))
        print(f"seed {seed}: full {full:7.1f} s   random skip {rnd:7.1f} s   scheduled {ours:7.1f} s"
              + (f"   + stage assignment {placed:7.1f} s" if args.assign else ""))
    full, rnd, ours, placed = (statistics.mean(r[i] for r in rows) for i in range(4))
    print(f"\n20 nodes, 12 regions, 6 stages, memory 3, skip 33%, {args.microbatches} microbatches of "
          f"{args.activation_mb:.0f} MB activations, {args.layer_s} s/stage forward at speed 1 (mean of "
          f"{args.seeds} seeds)")
    print(f"{'':18}{'iteration time':>16}{'vs full':>10}")
    results = [("full pipeline", full), ("random skip", rnd), ("scheduled paths", ours)]
    if args.assign:
        results.append(("+ assignment", placed))
    for name, v in results:
        print(f"{name:18}{v:14.1f} s{v / full:10.2f}")


if __name__ == "__main__":
    main()
