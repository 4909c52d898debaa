"""A user loop that raises mid-training inside ``with loco.Swarm`` / ``with loco.DiLoCo``,
then reports (JSON on stdout) what the library left behind in this process: threads,
child processes and sockets that were not there before."""

from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

import loco
from examples.plain_loop import make_model, teacher


def children() -> set[int]:
    out = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        out |= {int(x) for x in (task / "children").read_text().split()}
    return out


def sockets() -> set[str]:
    """This process's TCP sockets (ZeroMQ's, the DHT's): inodes of /proc/net/tcp{,6} entries
    that one of its file descriptors holds."""
    mine = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[9] in mine:
                found.add(f"{table}:{fields[1]}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--join", required=True)
    ap.add_argument("--fail-at", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)  # several processes share the test machine's cores
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads0, children0, sockets0 = {t.ident for t in threading.enumerate()}, children(), sockets()
    rounds, failed = 0, False
    try:
        with loco.Swarm(run_id="plain-loop", join=args.join) as swarm, \
                loco.DiLoCo(model, opt, swarm, inner_steps=10) as outer:
            for step in range(1000):
                x = torch.randn(32, 16)
                F.mse_loss(model(x), teacher(x)).backward()
                opt.step()
                opt.zero_grad()
                report = outer.step()
                if report is not None:
                    rounds += 1
                    print(f"round {report.round}: {report.status} with {report.group_size} ({report.reason})",
                          flush=True)
                if step == args.fail_at:
                    raise RuntimeError("a bug in the user's loop")
    except RuntimeError:
        failed = True
    left = [t.name for t in threading.enumerate() if t.ident not in threads0 and t.is_alive()]
    kids = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() for pid in children() - children0]
    print(json.dumps({"failed": failed, "rounds": rounds, "threads": left, "children": kids,
                      "sockets": sorted(sockets() - sockets0)}))


if __name__ == "__main__":
    main()
