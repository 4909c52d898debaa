"""Is loco's DDP baseline as good as the real thing? torch DistributedDataParallel (gloo)
vs loco's algorithm = "ddp", same model, data, batch, optimizer and step count, 4 nodes,
every node's link shaped to the same bandwidth.

  torch DDP (gloo):   each rank in its own network namespace, veth links shaped with tc tbf
                      (scripts/netns.py; root only). No added latency: this kernel has no
                      netem, which favours gloo.
  loco ddp:           `loco swarm` on 127.0.0.1 with the in-transport shaper at the same
                      bandwidth (and no added latency either)

    sudo python scripts/bench_ddp_gloo.py [--nodes 4] [--bandwidth 100mbit] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PORT = 29517


def worker(rank: int, world: int, master: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from loco.node.config import Config
    from loco.node.trainer import Trainer

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")  # the namespace's veth, not loopback
    cfg = Config()
    trainer = Trainer(cfg, f"node{rank}")  # same init, data stream and AdamW as a loco node
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{PORT}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(trainer.model)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        x, y = trainer.sampler.next_batch()
        for g in trainer.opt.param_groups:
            g["lr"] = trainer._lr()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        trainer.opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces gradients here
        torch.nn.utils.clip_grad_norm_(trainer.params, cfg.optim.grad_clip)
        trainer.opt.step()
        trainer.step += 1
        times.append(time.perf_counter() - start)
    val = trainer.evaluate()
    if rank == 0:
        warm = times[5:] or times
        print("RESULT " + json.dumps({"step_s": sum(warm) / len(warm), "val_loss": val}), flush=True)
    dist.destroy_process_group()


def run_gloo(nodes: int, bandwidth: str, steps: int) -> dict:
    from scripts.netns import Namespaces, address

    with Namespaces(nodes, bandwidth=bandwidth) as ns:
        procs = [subprocess.Popen(ns.command(i, [sys.executable, __file__, "--role", "worker", "--rank", str(i),
                                                 "--nodes", str(nodes), "--master", address(0),
                                                 "--steps", str(steps)]),
                                  cwd=ROOT, stdout=subprocess.PIPE, text=True) for i in range(nodes)]
        try:
            out = procs[0].communicate(timeout=3600)[0]
            for p in procs[1:]:
                p.wait(timeout=120)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return json.loads(out.split("RESULT", 1)[1])


def run_loco(nodes: int, bandwidth: str, steps: int) -> dict:
    from loco.node.metrics import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "loco.node.cli", "swarm", "--nodes", str(nodes), "--out", str(out),
                        "--set", "optim.algorithm='ddp'", "--set", f"optim.inner_steps={steps}",
                        "--set", "train.rounds=1", "--set", f"network.bandwidth='{bandwidth}'"],
                       cwd=ROOT, check=True, capture_output=True)
        rec = [r for r in read_metrics(out / "metrics" / "node0.jsonl") if r["event"] == "outer"][-1]
    return {"step_s": (rec["compute_s"] + rec["comm_s"]) / steps, "val_loss": rec["val_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--bandwidth", default="100mbit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--master", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "worker":
        worker(args.rank, args.nodes, args.master, args.steps)
        return
    if os.geteuid() != 0:
        sys.exit("root is needed for network namespaces")
    loco = run_loco(args.nodes, args.bandwidth, args.steps)
    gloo = run_gloo(args.nodes, args.bandwidth, args.steps)
    print(f"# {args.nodes} nodes, built-in GPT, batch 16x128, {args.steps} steps, links {args.bandwidth}, "
          "no added latency (no netem here: favours gloo)")
    print(f"{'implementation':<28} {'step s':>8} {'val loss':>9}")
    print(f"{'torch DDP (gloo, tc tbf)':<28} {gloo['step_s']:>8.3f} {gloo['val_loss']:>9.4f}")
    print(f"{'loco ddp (in-transport)':<28} {loco['step_s']:>8.3f} {loco['val_loss']:>9.4f}")
    print(f"gloo/loco step-time ratio: {gloo['step_s'] / loco['step_s']:.2f} (> 1: loco faster)")


if __name__ == "__main__":
    main()
