"""Averaging the same tensors among N local processes: loco vs gloo vs hivemind.

(a) loco: GroupAllReduce over ZeroMQ (matchmaking, reduce-scatter, all-gather, commit:
    the whole round as a node runs it; membership from a static list, so DHT lookups are
    not timed)
(b) torch.distributed gloo all_reduce (sum, then divide: the same mean)
(c) hivemind DecentralizedAverager.step (its own matchmaking through its DHT included,
    as a user of it would pay)

Every process holds ``size`` float32 elements; the time of a round is the slowest
process's, median over ``--repeats`` rounds after one warm-up. GB/s = tensor bytes per
peer / seconds.

    python scripts/bench_allreduce.py [--sizes 1000000,25000000] [--peers 2,4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loco(rank, n, size, repeats, barrier, endpoints, results) -> None:
    import torch

    torch.set_num_threads(1)
    from loco.protocols.collective import CollectiveTimeouts, GroupAllReduce
    from loco.protocols.membership import PeerInfo
    from loco.protocols.transport import Transport

    t = Transport(f"p{rank}")
    endpoints[rank] = t.endpoint
    barrier.wait()
    state = {"round": 0}
    peers = [PeerInfo(f"p{i}", endpoints[i], 0) for i in range(n) if i != rank]

    def live():
        return [PeerInfo(p.id, p.endpoint, state["round"]) for p in peers]

    coll = GroupAllReduce(t, live, CollectiveTimeouts(matchmaking_s=120, join_s=240, allreduce_s=240,
                                                      decision_s=120))
    data = [torch.randn(size)]
    times = []
    for r in range(repeats + 1):
        state["round"] = r
        barrier.wait()
        start = time.perf_counter()
        res = coll.all_reduce(r, data, 1.0, "h")
        times.append(time.perf_counter() - start)
        if res.status != "ok" or len(res.group) != n:
            raise RuntimeError(f"loco round {r}: {res.status} {res.reason}")
    results[rank] = times[1:]
    barrier.wait()
    t.close()


def _gloo(rank, n, size, repeats, barrier, port, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    data = torch.randn(size)
    times = []
    for _ in range(repeats + 1):
        barrier.wait()
        # in place, as a gloo user averages: no copy inside the timed region (the values
        # stay a mean of means, so repeats neither overflow nor change the work)
        start = time.perf_counter()
        dist.all_reduce(data)
        data /= n
        times.append(time.perf_counter() - start)
    results[rank] = times[1:]
    dist.destroy_process_group()


def _hivemind(rank, n, size, repeats, barrier, maddrs, results) -> None:
    import hivemind
    import torch

    mp.set_start_method("fork", force=True)  # hivemind forks its DHT process; spawn would pickle it

    torch.set_num_threads(1)
    if rank == 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        maddrs[0] = [str(m) for m in dht.get_visible_maddrs()]
    barrier.wait()
    if rank != 0:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs[0])
    avg = hivemind.averaging.DecentralizedAverager(
        [torch.randn(size)], dht, prefix="bench", target_group_size=n, min_group_size=n,
        min_matchmaking_time=1.0, request_timeout=10.0, start=True,
    )
    barrier.wait()
    times = []
    for r in range(repeats + 1):
        barrier.wait()
        start = time.perf_counter()
        out = avg.step(timeout=600)
        times.append(time.perf_counter() - start)
        if not out or len(out) != n:
            raise RuntimeError(f"hivemind round {r}: group {out and len(out)}")
    results[rank] = times[1:]
    barrier.wait()
    avg.shutdown()
    dht.shutdown()


def run(backend: str, n: int, size: int, repeats: int) -> float:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    barrier = ctx.Barrier(n)
    shared = manager.dict()
    target, extra = {"loco": (_loco, shared), "gloo": (_gloo, _free_port()), "hivemind": (_hivemind, shared)}[backend]
    procs = [ctx.Process(target=target, args=(r, n, size, repeats, barrier, extra, results)) for r in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=1800)
    for p in procs:
        if p.is_alive():
            p.kill()
    if len(results) != n:
        raise RuntimeError(f"{backend}: {n - len(results)} process(es) failed")
    per_round = [max(results[r][i] for r in range(n)) for i in range(repeats)]
    manager.shutdown()
    return statistics.median(per_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,25000000")
    ap.add_argument("--peers", default="2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="loco,gloo,hivemind")
    args = ap.parse_args()
    backends = args.backends.split(",")
    print(f"# {os.cpu_count()} cores; seconds per averaging round (median of {args.repeats}), GB/s = bytes/peer/s")
    header = f"{'peers':>5} {'floats':>10}" + "".join(f" {b + ' s':>11} {b + ' GB/s':>14}" for b in backends)
    # speed ratios (> 1: loco is faster), only when loco ran beside the baseline
    baselines = [b for b in ("gloo", "hivemind") if b in backends and "loco" in backends]
    header += "".join(f" {'loco/' + b:>14}" for b in baselines)
    print(header)
    for n in (int(x) for x in args.peers.split(",")):
        for size in (int(x) for x in args.sizes.split(",")):
            secs = {b: run(b, n, size, args.repeats) for b in backends}
            line = f"{n:>5} {size:>10}"
            for b in backends:
                line += f" {secs[b]:>11.3f} {size * 4 / 1e9 / secs[b]:>14.3f}"
            line += "".join(f" {secs[b] / secs['loco']:>14.2f}" for b in baselines)
            print(line, flush=True)


if __name__ == "__main__":
    main()
