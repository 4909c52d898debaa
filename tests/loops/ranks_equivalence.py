"""A lone member trains a few DiLoCo (or --algorithm streaming_diloco) rounds, either as --ranks 2 processes (DDP, or FSDP2's
fully_shard with --parallel fsdp; each rank its own half of every batch) or as one process
that takes both halves at once; it saves its final weights to --out. tests/test_ranks.py
compares them."""

from __future__ import annotations

import argparse
import datetime
import os
import socket

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


def run(rank: int, world: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ranks = None
    initial = [p.detach().clone() for p in model.parameters()]
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        if args.parallel == "fsdp":
            for layer in (model[0], model[2]):
                fully_shard(layer)
            fully_shard(model)
        else:
            model = DistributedDataParallel(model)
        ranks = loco.Ranks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    swarm = loco.Swarm(run_id="equivalence", insecure=True) if ranks is None or ranks.leads else None
    try:
        algorithm = loco.StreamingDiLoCo if args.algorithm == "streaming_diloco" else loco.DiLoCo
        with algorithm(model, opt, swarm, inner_steps=5, ranks=ranks) as outer:
            for step in range(args.steps):
                # one process: both ranks' halves in one batch (the mean over 2·HALF rows is the
                # mean of the two halves' means, which is what DDP averages)
                x = batches(rank, step) if world > 1 else torch.cat([batches(r, step) for r in range(2)])
                F.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin()).backward()
                opt.step()
                opt.zero_grad()
                outer.step(final=step == args.steps - 1)
        final = [p.full_tensor() if args.parallel == "fsdp" and world > 1 else p for p in model.parameters()]
        if rank == 0:
            torch.save({"initial": initial, "final": [p.detach().clone() for p in final]}, args.out)
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
    ap.add_argument("--algorithm", choices=["diloco", "streaming_diloco"], default="diloco")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.ranks == 1:
        run(0, 1, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(s.getsockname()[1])
    mp.spawn(run, args=(args.ranks, args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
