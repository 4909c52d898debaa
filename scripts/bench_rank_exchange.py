"""Round time of two members of two ranks each, when every rank sends its own region of
the round's exchange (rank_exchange "parallel") vs when rank 0 sends it all ("leader", the
baseline: what a member of several processes did before), on an emulated link. DiLoCo
(its exchange on the training thread), CO2 (``--algorithm co2``: its reduce runs on the
leader's background thread while the ranks train on, and lands a round later) or Streaming
DiLoCo (``--algorithm streaming_diloco``: 2 fragments over 4 inner steps a round, each sent
in the background and landing a step later; ``data_s`` is not reported, ``comm_s`` is what
the round's steps waited for the fragments) or NoLoCo (``--algorithm noloco``: the two members
pair up every round; ``data_s`` is its ``exchange_s``, the leaders' handshake and the data;
with FSDP and "parallel" every rank gossips its own region of the outer state, the baseline's
rank 0 gathers the weights and gossips the whole). DDP (``--algorithm ddp --parallel fsdp``:
every step's gradients averaged across the members, 4 steps a round) compares FSDP inside
(every rank reads its region of the gradients out of its shards, averages it from its own
endpoint, writes the mean back, and publishes its region of the weights and AdamW moments
every step, hashed on rank 0 as the regions pass through it) with DDP inside (the baseline:
every rank holds the whole model; rank 0 scatters the mean's regions and gathers them back),
both exchanging from every rank; ``round_s`` is then 4 steps with their syncs.

Each member is two processes (a gloo group, FSDP2 or DDP inside) training the same MLP;
each endpoint's uplink is shaped to ``--bandwidth`` by loco's in-transport shaper, so a
member that sends from both ranks has twice the uplink: the setting of a site whose GPUs
each have their own network path. A round's communication time is the leader's report's
``comm_s`` (matchmaking, both data phases, the commit, and the scatter and gather of the
regions inside the member); the table gives the median over the rounds both members
averaged together, after the first, of ``data_s`` (both data phases, with the scatter and
gather of the regions inside the member) and ``comm_s`` (data_s plus matchmaking, where a
member waits for the other to finish its inner steps, and the commit). With CO2 a round's
``data_s`` is that of the reduce it applied (run in the background during the round) and
``comm_s`` only what the round waited for it. ``outer state/rank``: the most any rank keeps
of the outer state (``outer.outer_state_bytes``: anchor and momentum and the published copy
of them served to peers; with FSDP and DiLoCo exchanging from every rank, each rank's own
region of both). ``publish_s``: the leader's time to publish the state a round ended with
(with the split outer state: every rank's part, and the whole hash computed on rank 0 as the
ranks' regions pass through it; otherwise a copy, hashed in the background). ``round_s``: a
round's wall time, its compute, communication and publish together (Streaming DiLoCo: the
gathers and scatters of a fragment's weights inside the member are counted in compute).

    python scripts/bench_rank_exchange.py [--params 2000000] [--bandwidth 200mbit] [--rounds 5]
                                          [--parallel fsdp|ddp] [--algorithm diloco|co2|streaming_diloco|noloco|ddp]
                                          [--staleness fixed|gap_aware]   (co2)
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# inner steps per round: Streaming DiLoCo's 2 fragments (overlap 1) need 4, each sent once a round
INNER_STEPS = {"diloco": 2, "co2": 2, "streaming_diloco": 4, "noloco": 2, "ddp": 4}
sys.path.insert(0, str(ROOT))


def _member(args: argparse.Namespace) -> None:
    """One member (this process spawns its ranks)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(args,), nprocs=2, join=True)


def _rank(rank: int, args: argparse.Namespace) -> None:
    import json

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    import loco

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=600))
    width = int((args.params / 2) ** 0.5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
    if args.parallel == "fsdp":
        mesh = init_device_mesh("cpu", (2,))  # (on a GPU host too: these members train on the CPU)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ranks = loco.Ranks()
    swarm = None
    if ranks.leads:
        swarm = loco.Swarm(run_id="bench-ranks", join=args.join, network=loco.Network(bandwidth=args.bandwidth))
        if args.join is None:
            print("join with:", swarm.join_token, flush=True)
    timeouts = loco.Timeouts(allreduce_timeout_s=600, matchmaking_timeout_s=300, join_timeout_s=600)
    data = torch.Generator().manual_seed(rank)
    try:
        algorithm = {"diloco": loco.DiLoCo, "co2": loco.CO2, "streaming_diloco": loco.StreamingDiLoCo,
                     "noloco": loco.NoLoCo, "ddp": loco.DDP}[args.algorithm]
        inner = INNER_STEPS[args.algorithm]
        settings = {"exchange_timeout_s": 600} if args.algorithm == "noloco" else {}
        if args.staleness:
            settings["staleness"] = args.staleness
        with algorithm(model, opt, swarm, inner_steps=inner, ranks=ranks, wait_for_peers=1, timeouts=timeouts,
                       rank_exchange=args.mode, **settings) as outer:
            for step in range(1, inner * args.rounds + 1):
                x = torch.randn(8, width, generator=data)
                model(x).square().mean().backward()
                opt.step()
                opt.zero_grad()
                report = outer.step(final=step == inner * args.rounds)
                if report is not None and ranks.leads:
                    print("ROUND " + json.dumps({"round": report.round, "status": report.status,
                                                 "group": report.group_size, "comm_s": report.comm_s,
                                                 "compute_s": report.compute_s,
                                                 "data_s": report.extra.get("data_s",
                                                                            report.extra.get("exchange_s", 0.0)),
                                                 "publish_s": report.publish_s,
                                                 "bytes": report.round_bytes}), flush=True)
            # what this rank keeps of the outer state (published copy included)
            # one write per line: both ranks print to the same file, and print() writes the line
            # and its newline apart (lines of the two ranks came out interleaved)
            sys.stdout.write("STATE " + json.dumps({"rank": rank, "bytes": outer.outer_state_bytes}) + "\n")
            sys.stdout.flush()
    finally:
        if swarm is not None:
            swarm.close()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str, parallel: str, args: argparse.Namespace) -> list[dict]:
    import json

    base = [sys.executable, __file__, "--member", "--mode", mode, "--params", str(args.params),
            "--bandwidth", args.bandwidth, "--rounds", str(args.rounds), "--parallel", parallel,
            "--algorithm", args.algorithm, *(["--staleness", args.staleness] if args.staleness else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / "a.log", Path(tmp) / "b.log"]
        with open(logs[0], "w") as la:
            a = subprocess.Popen([*base, "--port", str(_free_port())], stdout=la, stderr=subprocess.STDOUT, env=env)
            try:
                deadline = time.monotonic() + 300
                while not (token := re.search(r"join with: (\S+)", logs[0].read_text())):
                    if a.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"member a did not start:\n{logs[0].read_text()[-2000:]}")
                    time.sleep(0.5)
                with open(logs[1], "w") as lb:
                    b = subprocess.Popen([*base, "--port", str(_free_port()), "--join", token.group(1)], stdout=lb,
                                         stderr=subprocess.STDOUT, env=env)
                    try:
                        for p, log in ((a, logs[0]), (b, logs[1])):
                            if p.wait(timeout=1800) != 0:
                                raise RuntimeError(f"a member failed:\n{log.read_text()[-3000:]}")
                    finally:
                        if b.poll() is None:
                            b.kill()
            finally:
                if a.poll() is None:
                    a.kill()
        lines = logs[0].read_text().splitlines()
        rounds = [json.loads(line[6:]) for line in lines if line.startswith("ROUND ")]
        state = max(json.loads(line[6:])["bytes"] for line in lines if line.startswith("STATE "))
        return rounds, state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=2_000_000, help="parameters of the MLP (about)")
    ap.add_argument("--bandwidth", default="200mbit", help="each endpoint's emulated uplink")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="what the ranks do inside a member")
    ap.add_argument("--algorithm", choices=sorted(INNER_STEPS), default="diloco")
    ap.add_argument("--staleness", choices=["fixed", "gap_aware"], help="co2's staleness penalty (default fixed)")
    ap.add_argument("--member", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="parallel", help=argparse.SUPPRESS)
    ap.add_argument("--join", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.staleness and args.algorithm != "co2":
        ap.error(f"--staleness is co2's penalty, not {args.algorithm}'s")
    if args.member:
        _member(args)
        return
    # (exchange, inside, label): the baseline first
    runs = [("leader", args.parallel, "rank 0 sends all (baseline)"), ("parallel", args.parallel, "every rank its region")]
    if args.algorithm == "ddp" and args.parallel == "fsdp":  # (rank 0 cannot send it all: it never holds it)
        runs = [("parallel", "ddp", "DDP inside (baseline)"), ("parallel", "fsdp", "FSDP inside")]
    medians = {}
    for mode, parallel, label in runs:
        rounds, state = _run(mode, parallel, args)
        together = [r for r in rounds[1:-1] if r["status"] == "ok" and r["group"] == 2]
        if not together:
            raise SystemExit(f"{label}: no round averaged by both members: {rounds}")
        medians[label] = (statistics.median(r["data_s"] for r in together), statistics.median(r["comm_s"] for r in together),
                         len(together), statistics.median(r["bytes"] for r in together), state,
                         statistics.median(r["publish_s"] for r in together),
                         statistics.median(r["compute_s"] + r["comm_s"] + r["publish_s"] for r in together))
    what = f"{args.algorithm} ({args.staleness})" if args.staleness else args.algorithm
    inside = "" if len({parallel for _, parallel, _ in runs}) > 1 else f" ({args.parallel} inside)"
    print(f"\ntwo members x 2 ranks{inside}, {what}, ~{args.params / 1e6:.1f}M float32 parameters, "
          f"each endpoint's uplink {args.bandwidth}")
    print(f"{'exchange':<30}{'data_s':>8}{'vs base':>11}{'comm_s':>8}{'vs base':>11}{'rounds':>8}"
          f"{'bytes/round':>13}{'outer state/rank':>18}{'publish_s':>11}{'round_s':>9}{'vs base':>9}")
    data0, comm0 = medians[runs[0][2]][:2]
    round0 = medians[runs[0][2]][-1]
    for _, _, label in runs:
        data, comm, n, b, state, publish, round_s = medians[label]
        vs_data = f"{data / data0:>10.2f}x" if data0 else f"{'-':>11}"  # (Streaming DiLoCo, DDP report none)
        print(f"{label:<30}{data:>8.2f}{vs_data}{comm:>8.2f}{comm / comm0:>10.2f}x{n:>8}{b / 1e6:>12.1f}M"
              f"{state / 1e6:>17.1f}M{publish:>11.3f}{round_s:>9.2f}{round_s / round0:>8.2f}x")


if __name__ == "__main__":
    main()
