"""A lone member trains a few DiLoCo (or --algorithm streaming_diloco, co2, co2_gap_aware, noloco: its
local-only step, with no partner; ddp: its gradients averaged alone every step) rounds, either as
--ranks 2 processes (DDP, or FSDP2's fully_shard with --parallel fsdp; each rank its own half
of every batch) or as one process
that takes both halves at once; it saves its final weights to --out. tests/test_ranks.py
compares them. --poison-step: a weight goes NaN mid-round, and the member goes back to its
last synchronized state. --reload-step: every rank loads back the outer.state_dict() it
saved after the first round (with FSDP and DiLoCo or CO2, its own region of the outer state)."""

from __future__ import annotations

import argparse
import datetime
import functools

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import loco

HALF = 16  # rows each rank draws per step


def batches(rank: int, step: int) -> torch.Tensor:
    return torch.randn(HALF, 8, generator=torch.Generator().manual_seed(1000 * step + rank))


@torch.no_grad()
def poison(model: torch.nn.Module, rank: int, world: int, parallel: str) -> None:
    """The first bias of the first layer goes NaN: with FSDP over two ranks it lies in rank
    0's shard but in rank 1's region of the flat vector (its outer state's)."""
    if world > 1 and parallel == "fsdp":
        if rank == 0:
            model[0].bias.to_local()[0] = float("nan")
        return
    layer = model.module[0] if world > 1 else model[0]
    layer.bias[0] = float("nan")


def run(rank: int, world: int, args: argparse.Namespace, store_port: int = 0) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ranks = None
    initial = [p.detach().clone() for p in model.parameters()]
    if world > 1:
        timeout = datetime.timedelta(seconds=120)
        store = dist.TCPStore("127.0.0.1", store_port, world_size=world + 1, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout, store=store)
        if args.parallel == "fsdp":
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
        else:
            model = DistributedDataParallel(model)
        ranks = loco.Ranks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    restored: list[int] = []  # rounds that restored the last synchronized state
    saved, saved_hash, reloaded = None, "", None
    swarm = loco.Swarm(run_id="equivalence", insecure=True) if ranks is None or ranks.leads else None
    try:
        algorithm = {"diloco": loco.DiLoCo, "streaming_diloco": loco.StreamingDiLoCo, "co2": loco.CO2,
                     "noloco": loco.NoLoCo, "ddp": loco.DDP,
                     "co2_gap_aware": functools.partial(loco.CO2, staleness="gap_aware")}[args.algorithm]
        settings = {"overlap": args.overlap} if args.algorithm == "streaming_diloco" else {}
        with algorithm(model, opt, swarm, inner_steps=5, ranks=ranks, rank_exchange=args.rank_exchange,
                       **settings) as outer:
            for step in range(args.steps):
                # one process: both ranks' halves in one batch (the mean over 2·HALF rows is the
                # mean of the two halves' means, which is what DDP averages)
                x = batches(rank, step) if world > 1 else torch.cat([batches(r, step) for r in range(2)])
                F.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin()).backward()
                opt.step()
                opt.zero_grad()
                if step == args.poison_step:
                    poison(model, rank, world, args.parallel)
                report = outer.step(final=step == args.steps - 1)
                if report is not None and report.extra.get("restored"):
                    restored.append(report.round)
                if report is not None and outer.round == 1 and saved is None:  # every rank saves its own
                    saved, saved_hash = outer.state_dict(), report.weights_hash
                if step == args.reload_step:  # every rank goes back to what it saved after round 1
                    outer.load_state_dict(saved)
                    reloaded = (outer.round, outer.weights_hash(), saved_hash)
        final = [p.full_tensor() if args.parallel == "fsdp" and world > 1 else p for p in model.parameters()]
        if rank == 0:
            torch.save({"initial": initial, "final": [p.detach().clone() for p in final], "restored": restored,
                        "reloaded": reloaded}, args.out)
        if world > 1:  # (every rank past its last collective before any tears the group down)
            dist.barrier()
    finally:
        if swarm is not None:
            swarm.close()
        if world > 1:
            dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, choices=[1, 2], default=1)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--algorithm", choices=["diloco", "streaming_diloco", "co2", "co2_gap_aware", "noloco", "ddp"], default="diloco")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overlap", type=int, default=1, help="Streaming DiLoCo's overlap (inner steps)")
    ap.add_argument("--rank-exchange", choices=["parallel", "leader"], default="parallel")
    ap.add_argument("--poison-step", type=int, default=-1, help="a weight goes NaN after this step (-1: none)")
    ap.add_argument("--reload-step", type=int, default=-1,
                    help="after this step every rank loads the outer.state_dict() it saved after round 1 (-1: none)")
    args = ap.parse_args()
    if args.ranks == 1:
        run(0, 1, args)
        return
    # the ranks meet at a store served here on an OS-chosen port (a free port picked and handed
    # on can be taken by another process before the ranks bind it: seen beside a busy suite)
    store = dist.TCPStore("127.0.0.1", 0, world_size=args.ranks + 1, is_master=True, wait_for_workers=False)
    # (forked from one server process that imported this script once, not a fresh interpreter each)
    mp.start_processes(run, args=(args.ranks, args, store.port), nprocs=args.ranks, join=True,
                       start_method="forkserver")


if __name__ == "__main__":
    main()
