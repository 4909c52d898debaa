"""A plain PyTorch training loop that joins a loco swarm.

Start it twice on one machine; the second process joins the first through the DHT:

    python examples/plain_loop.py                      # prints "join with: TOKEN" (the swarm key and its address)
    python examples/plain_loop.py --join TOKEN

With ``--checkpoint FILE`` a process saves after every round and, started again with the
same FILE, resumes there and rejoins. Each process fits the same small regression model on
its own stream of data; every
``--inner-steps`` steps the processes average what they learned (DiLoCo by default; any of
diloco, streaming_diloco, noloco, co2, ddp). The lines marked ``# loco`` are all that joins
the swarm; the rest is an ordinary loop.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

import loco  # loco

ALGORITHMS = {"diloco": "DiLoCo", "streaming_diloco": "StreamingDiLoCo", "noloco": "NoLoCo", "co2": "CO2",
              "ddp": "DDP"}


def make_model() -> nn.Module:
    torch.manual_seed(0)  # every process starts from the same weights
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def teacher(x: torch.Tensor) -> torch.Tensor:
    """The function to learn: a fixed random two-layer network."""
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(16, 32, generator=g) / 4, torch.randn(32, 1, generator=g) / 4
    return torch.tanh(x @ w1) @ w2


def append_json(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def save(state: dict, path: str) -> None:
    """Atomically: a crash mid-write leaves the previous checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--join", metavar="TOKEN", help="the join token a member printed (none: start a new swarm)")
    ap.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="diloco")
    ap.add_argument("--steps", type=int, default=300, help="inner steps to train")
    ap.add_argument("--inner-steps", type=int, default=50, help="H: inner steps per round")
    ap.add_argument("--peers", type=int, default=0, help="wait for this many peers before training")
    ap.add_argument("--seed", type=int, default=1, help="this process's data stream")
    ap.add_argument("--run-id", default="plain-loop")
    ap.add_argument("--report", help="write one JSON line per round here")
    ap.add_argument("--until", metavar="FILE", help="train past --steps until FILE exists (lets a script end the run)")
    ap.add_argument("--checkpoint", metavar="FILE", help="save here after every round; resume from it if it exists")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="where the model trains (cpu, cuda, cuda:N)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = make_model().to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed)
    resume = args.checkpoint and os.path.exists(args.checkpoint)
    saved = torch.load(args.checkpoint, map_location=args.device) if resume else None
    if saved is not None:  # resume: this process's own model, optimizer, data position
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        data.set_state(saved["data"].cpu())
    val_x = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))
    val_y = teacher(val_x)
    val_x, val_y = val_x.to(args.device), val_y.to(args.device)

    with loco.Swarm(run_id=args.run_id, join=args.join) as swarm:  # loco
        print("join with:", swarm.join_token, flush=True)
        algorithm = getattr(loco, ALGORITHMS[args.algorithm])
        with algorithm(model, opt, swarm, inner_steps=args.inner_steps, wait_for_peers=args.peers,  # loco
                       join=saved is None) as outer:  # loco
            step = 0
            if saved is not None:
                outer.load_state_dict(saved["outer"])  # loco: outer state, round, residuals
                outer.join()  # loco: catches up from a peer if the swarm has moved on
                step = saved["step"]
            while step < args.steps or (args.until and not os.path.exists(args.until)):
                x = torch.randn(32, 16, generator=data)
                loss = F.mse_loss(model(x.to(args.device)), teacher(x).to(args.device))
                loss.backward()
                opt.step()
                opt.zero_grad()
                step += 1
                last = step >= args.steps and not (args.until and not os.path.exists(args.until))
                report = outer.step(final=last)  # loco
                if report is None:
                    continue
                if args.checkpoint:
                    save({"model": model.state_dict(), "opt": opt.state_dict(), "data": data.get_state(),
                          "outer": outer.state_dict(), "step": step}, args.checkpoint)  # loco: outer.state_dict()
                with torch.no_grad():
                    val = F.mse_loss(model(val_x), val_y).item()
                print(f"round {report.round}: {report.status} with {report.group_size} "
                      f"val {val:.4f} sent {report.bytes_sent / 1e3:.0f} kB", flush=True)
                if args.report:
                    append_json(args.report, {"round": report.round, "status": report.status,
                                             "reason": report.reason, "group_size": report.group_size, "val_loss": val,
                                             "weights_hash": report.weights_hash})


if __name__ == "__main__":
    main()
