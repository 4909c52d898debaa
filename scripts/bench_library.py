"""Overhead of the library in a user's loop: inner steps of the same model with and without
``outer.step()`` after each, on the CPU, measured in the same run (alternating blocks, best
of ``--repeats``), plus the cost of one ``outer.step()`` call between rounds.

The loop is a plain one: the built-in GPT's shape, AdamW, random byte batches. The process
is alone in its swarm (a real DHT and socket) with ``inner_steps`` above the measured
steps, so no round falls inside a timed block: what is timed is the per-step cost a user
pays between rounds.

    python scripts/bench_library.py [--steps 60] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import loco
from loco.node.config import ModelConfig
from loco.node.model import GPT


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-layer", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=args.n_layer))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (16, 129))

    def inner_step() -> None:
        logits = model(batch[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with loco.Swarm(run_id="bench-library") as swarm, \
            loco.DiLoCo(model, opt, swarm, inner_steps=10 ** 9) as outer:
        step_calls: list[float] = []

        def with_loco() -> None:
            inner_step()
            t0 = time.perf_counter()
            outer.step()
            step_calls.append(time.perf_counter() - t0)

        for _ in range(5):  # warm-up
            inner_step()
        plain, lib = [], []
        for _ in range(args.repeats):
            for fn, out in ((inner_step, plain), (with_loco, lib)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                out.append((time.perf_counter() - t0) / args.steps)
    base, ours = min(plain), min(lib)
    print(f"model: built-in GPT, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"batch 16x128, {args.threads} threads, {args.steps} steps x {args.repeats} blocks each")
    print(f"{'loop':<28}{'ms/step (best)':>16}{'ms/step (median)':>18}{'ratio':>8}")
    print(f"{'plain loop (baseline)':<28}{base * 1e3:>16.2f}{statistics.median(plain) * 1e3:>18.2f}{1.0:>8.3f}")
    print(f"{'plain loop + outer.step()':<28}{ours * 1e3:>16.2f}{statistics.median(lib) * 1e3:>18.2f}"
          f"{ours / base:>8.3f}")
    print(f"outer.step() between rounds: median {statistics.median(step_calls) * 1e6:.1f} us, "
          f"max {max(step_calls) * 1e6:.1f} us over {len(step_calls)} calls")


if __name__ == "__main__":
    main()
