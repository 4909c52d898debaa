"""One swarm member made of several processes: PyTorch DDP (or FSDP2) inside, loco across.

Each member is a torch.distributed group (gloo on the CPU, NCCL with --device cuda) whose
ranks train with ``DistributedDataParallel`` (``--parallel fsdp``: FSDP2's ``fully_shard``,
each rank holding a shard of every layer); its rank 0 joins the swarm and the other ranks
follow it (``loco.Ranks``). Start a member of two ranks, then a second member that joins it:

    python examples/ddp_node.py --nproc-per-node 2             # prints "join with: TOKEN"
    python examples/ddp_node.py --nproc-per-node 2 --join TOKEN

or start a member's ranks with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR/PORT):

    torchrun --nproc-per-node 2 examples/ddp_node.py --join TOKEN

Every rank draws its own batches, so a member of N ranks trains on N batches a step. The
lines marked ``# loco`` are what joins the swarm; the rest is an ordinary DDP script.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import loco  # loco

ALGORITHMS = {"diloco": "DiLoCo", "streaming_diloco": "StreamingDiLoCo", "noloco": "NoLoCo", "co2": "CO2",
              "ddp": "DDP"}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # every rank of every member starts from the same weights
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1))


def teacher(x: torch.Tensor) -> torch.Tensor:
    """The function to learn: a fixed random two-layer network."""
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(16, 32, generator=g) / 4, torch.randn(32, 1, generator=g) / 4
    return torch.tanh(x @ w1) @ w2


def model_hash(model: torch.nn.Module) -> str:
    """The member's weights as this rank sees them, hashed (equal on the ranks of a member
    after every step; sharded weights are gathered first, on every rank)."""
    h = hashlib.sha256()
    for p in model.parameters():
        whole = p.full_tensor() if isinstance(p, DTensor) else p
        h.update(whole.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def train(rank: int, world: int, args: argparse.Namespace, store_port: int | None = None) -> None:
    torch.set_num_threads(1)
    # the launcher ends the other ranks with SIGTERM when one fails: leave the swarm on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    backend = "nccl" if args.device == "cuda" else "gloo"
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    # a rank that dies stops the others at their next broadcast, at the latest after this
    timeout = datetime.timedelta(seconds=args.timeout_s)
    # started by main(): meet at the launcher's store (torchrun: its environment variables)
    store = None if store_port is None else dist.TCPStore("127.0.0.1", store_port, world_size=world + 1,
                                                          is_master=False, timeout=timeout)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, store=store)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.parallel == "fsdp":
        model = make_model().to(device)
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        plain = model
    else:
        model = DistributedDataParallel(make_model().to(device))
        plain = model.module
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own batches
    val_x = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))
    val_x, val_y = val_x.to(device), teacher(val_x).to(device)

    ranks = loco.Ranks()  # loco: this member's processes; rank 0 speaks for them
    swarm = loco.Swarm(run_id=args.run_id, join=args.join) if ranks.leads else None  # loco
    try:
        if swarm is not None:
            print("join with:", swarm.join_token, flush=True)
        algorithm = getattr(loco, ALGORITHMS[args.algorithm])
        settings = {"staleness": args.staleness} if args.staleness else {}  # (CO2's penalty)
        with algorithm(model, opt, swarm, inner_steps=args.inner_steps, ranks=ranks,  # loco
                       wait_for_peers=args.peers, rank_exchange=args.rank_exchange,  # loco
                       compression=args.compression, **settings) as outer:  # loco
            for step in range(1, args.steps + 1):
                x = torch.randn(32, 16, generator=data)
                loss = F.mse_loss(model(x.to(device)), teacher(x).to(device))
                loss.backward()
                opt.step()
                opt.zero_grad()
                report = outer.step(final=step == args.steps)  # loco: on every rank
                if report is None:
                    continue
                with torch.no_grad():
                    val = F.mse_loss(plain(val_x), val_y).item()  # (FSDP: a forward of every rank)
                if ranks.leads:
                    print(f"round {report.round}: {report.status} with {report.group_size} val {val:.4f}", flush=True)
                if args.report:
                    with open(f"{args.report}.rank{rank}", "a") as f:
                        f.write(json.dumps({"pid": os.getpid(), "round": report.round, "status": report.status,
                                            "reason": report.reason, "val_loss": val,
                                            "group_size": report.group_size, "weights_hash": report.weights_hash,
                                            "model_hash": model_hash(model),
                                            # a rank > 0's own endpoint (rank_exchange "parallel")
                                            "rank_bytes_sent": 0 if ranks.leads else outer.bytes_sent,
                                            # outer state this rank keeps, published copy included (FSDP + DiLoCo: its region's)
                                            "outer_state_bytes": outer.outer_state_bytes}) + "\n")
        # every rank past its last collective before any tears the group down (a rank that
        # destroyed it while a peer's last op was still finishing aborted in gloo's C++)
        dist.barrier()
    finally:
        if swarm is not None:
            swarm.close()
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc-per-node", type=int, default=1, help="ranks of this member (ignored under torchrun)")
    ap.add_argument("--join", metavar="TOKEN", help="the join token a member printed (none: start a new swarm)")
    ap.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="diloco")
    ap.add_argument("--staleness", choices=["fixed", "gap_aware"],
                    help="co2: its staleness penalty (fixed by default)")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                    help="inside the member: DDP, or FSDP2 (diloco, streaming_diloco, co2, noloco)")
    ap.add_argument("--rank-exchange", choices=["parallel", "leader"], default="parallel",
                    help="every rank sends its own region of what the member averages, or rank 0 all of it")
    ap.add_argument("--compression", choices=["none", "fp16", "bf16", "int8", "int4", "topk", "powersgd"],
                    default="none", help="codec for what the member sends to the swarm")
    ap.add_argument("--steps", type=int, default=300, help="inner steps to train")
    ap.add_argument("--inner-steps", type=int, default=50, help="H: inner steps per round")
    ap.add_argument("--peers", type=int, default=0, help="wait for this many other members before training")
    ap.add_argument("--seed", type=int, default=1, help="this member's data streams")
    ap.add_argument("--run-id", default="ddp-node")
    ap.add_argument("--report", help="each rank writes one JSON line per round to REPORT.rank<N>")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--timeout-s", type=float, default=600.0,
                    help="how long a rank waits for the member's others (more than rank 0 may take to join)")
    args = ap.parse_args()
    if args.staleness and args.algorithm != "co2":
        ap.error(f"--staleness is CO2's penalty; --algorithm is {args.algorithm}")
    if "RANK" in os.environ:  # started by torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    # the ranks meet at a store this process serves on a port the OS picks (a port picked free
    # and handed on could be taken by another program before the ranks bind it)
    store = dist.TCPStore("127.0.0.1", 0, world_size=args.nproc_per_node + 1, is_master=True, wait_for_workers=False)
    # a rank that fails ends the others (they are terminated), so the member leaves whole; the
    # ranks are forked from one server process that imported this script (torch, loco) once
    mp.start_processes(train, args=(args.nproc_per_node, args, store.port), nprocs=args.nproc_per_node, join=True,
                       start_method="forkserver")


if __name__ == "__main__":
    main()
