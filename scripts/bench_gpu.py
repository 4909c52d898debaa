"""GPU benchmark: loco's inner steps vs a plain PyTorch loop, and the cost of an outer round.

Run on a machine with a CUDA GPU (python scripts/bench_gpu.py). Every figure is measured in
this run, on this card:

1. Inner-step throughput (tokens/s) of the built-in GPT at ~86M parameters: a plain
   PyTorch loop as a performance-minded user writes it (torch.compile, fused AdamW,
   batches from pinned memory, the same data sampler) in this process, then the same
   model inside a real `loco node start` daemon (its DHT, transport and membership
   threads running; train.compile at its default), read from its metrics (tokens /
   compute time of the last round), interleaved ``--repeats`` times, then the plain loop
   once more. Ratio = median(daemon) / median(plain). The eager plain loop (no compile,
   for-each AdamW) is printed for reference.
2. One DiLoCo outer round between 2 local nodes (one GPU each if there are two, else both
   on one): the time training is blocked per round (pseudo-gradient, device-to-host,
   all-reduce over ZeroMQ, host-to-device, outer step), with the outer state on the GPU
   and in pinned host memory (peak GPU memory of each), and CO2's blocked time for the
   same model (the all-reduce runs during the next round); DiLoCo and CO2 once more with no
   checkpoint in the measured rounds, where CO2's wall time per round should not exceed
   DiLoCo's. Every round record's parts add up to its ``wall_s``; ``utilization`` is
   compute over wall time.
3. The pieces of (2) alone: one device-to-host and host-to-device copy of the model
   through the reused pinned buffers, and the outer Nesterov step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_model import plain_loop  # noqa: E402 (this folder: the same plain loop for any model)

from loco.node.config import build_config  # noqa: E402
from loco.node.metrics import read_metrics  # noqa: E402
from loco.node.model import GPT  # noqa: E402
from loco.node.staging import HostStaging  # noqa: E402
from loco.optim.outer import nesterov_sgd_step  # noqa: E402

# the parts of a round outside the inner steps, as the outer records report them
BETWEEN = ("wait_s", "hash_wait_s", "serve_s", "publish_s", "eval_s", "checkpoint_s", "weights_hash_s")
MODEL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024}


def _sets(items: dict) -> list[str]:
    out = []
    for k, v in items.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def run_loco(args: list[str], out: Path, timeout_s: float = 900) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = (out.parent / f"{out.name}.log").open("w")
    p = subprocess.run([sys.executable, "-m", "loco.node.cli", *args, "--out", str(out)], cwd=REPO, env=env,
                       stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if p.returncode:
        raise RuntimeError(f"loco {' '.join(args[:2])} failed; see {log.name}:\n{Path(log.name).read_text()[-3000:]}")


def base_sets(precision: str, steps: int, rounds: int) -> dict:
    return {**{f"model.{k}": v for k, v in MODEL.items()}, "data.batch_size": 16, "data.val_batches": 2,
            "optim.inner_steps": steps, "optim.warmup_steps": 0, "train.rounds": rounds,
            "train.precision": precision, "train.log_every": 1000, "node.device": "auto"}


def daemon_tokens_per_s(tmp: Path, precision: str, steps: int) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"daemon-{precision}"
    run_loco(["node", "start", "--node-id", "node0", *_sets(base_sets(precision, steps, 3))], out)
    rounds = [r for r in read_metrics(out / "metrics" / "node0.jsonl") if r["event"] == "outer"]
    last, prev = rounds[-1], rounds[-2]  # the last round: warm (the first includes start-up and compiling)
    return (last["tokens"] - prev["tokens"]) / last["compute_s"]


def outer_round(tmp: Path, name: str, extra: dict, steps: int, rounds: int) -> dict:
    out = tmp / name
    run_loco(["swarm", "--nodes", "2", *_sets({**base_sets("bf16", steps, rounds), **extra})], out)
    per_node = []
    for n in ("node0", "node1"):
        recs = read_metrics(out / "metrics" / f"{n}.jsonl")
        start = next(r for r in recs if r["event"] == "start")
        outer = [r for r in recs if r["event"] == "outer"][1:]  # skip the first (start-up)
        per_node.append({"device": start["device"], "blocked_s": sum(r["comm_s"] for r in outer) / len(outer),
                         "compute_s": sum(r["compute_s"] for r in outer) / len(outer),
                         "gpu_mem_gb": max(r.get("gpu_mem_gb", 0.0) for r in outer),
                         "sync_mb": max(outer[-1]["sync_bytes"]) / 1e6, "status": [r["status"] for r in outer],
                         "group": [r["group_size"] for r in outer],
                         "publish_s": sum(r.get("publish_s", 0.0) for r in outer) / len(outer),
                         "reduce_s": [round(r.get("reduce_s", float("nan")), 3) for r in outer],
                         # where the time between two rounds' computation goes (README: Metrics)
                         "between_s": {k: sum(r.get(k, 0.0) for r in outer) / len(outer) for k in BETWEEN},
                         "wall_s": sum(r["wall_s"] for r in outer) / len(outer),
                         "utilization": sum(r["utilization"] for r in outer) / len(outer)})
    return {"name": name, "nodes": per_node}


def pieces(cfg) -> dict:
    dev = torch.device("cuda")
    model = GPT(cfg.model).to(dev)
    params = list(dict.fromkeys(model.parameters()))
    staging = HostStaging(dev)
    anchor = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(p) for p in params]
    times = {"d2h_s": [], "h2d_s": [], "outer_step_s": []}
    for i in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        slot, host = staging.to_host(params)
        t1 = time.perf_counter()
        dev_views = staging.to_device(slot, host)
        t2 = time.perf_counter()
        nesterov_sgd_step(anchor, buf, dev_views, 0.7, 0.9, True, first=i == 0)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i:
            times["d2h_s"].append(t1 - t0)
            times["h2d_s"].append(t2 - t1)
            times["outer_step_s"].append(t3 - t2)
    numel = sum(p.numel() for p in params)
    return {"params_m": numel / 1e6, **{k: sum(v) / len(v) for k, v in times.items()},
            "gb_per_s_d2h": numel * 4 / 1e9 / (sum(times["d2h_s"]) / len(times["d2h_s"])),
            "allocations": staging.allocations}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="inner steps per measurement")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--skip-swarm", action="store_true", help="only the single-process measurements")
    ap.add_argument("--only-swarm", action="store_true", help="only the outer-round measurements")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved daemon / plain-loop pairs per precision")
    ap.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16, fp32")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    card = torch.cuda.get_device_name(0)
    results: dict = {"card": card, "gpus": torch.cuda.device_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for precision in () if a.only_swarm else a.precisions.split(","):
            cfg = build_config({"model": MODEL, "data": {"batch_size": 16}, "train": {"precision": precision},
                                "node": {"device": "cuda"}})
            eager = plain_loop(cfg, a.steps, warmup=5)
            plain, daemon = [], []
            for i in range(a.repeats):  # interleaved, so drifting clocks or heat touch both alike
                plain.append(plain_loop(cfg, a.steps, warmup=5, compiled=True))
                daemon.append(daemon_tokens_per_s(tmp / str(i), precision, a.steps))
            plain.append(plain_loop(cfg, a.steps, warmup=5, compiled=True))
            results[f"throughput_{precision}"] = {"plain_eager": eager, "plain": plain, "daemon": daemon,
                                                  "ratio": statistics.median(daemon) / statistics.median(plain)}
        if not a.only_swarm:
            results["pieces"] = pieces(build_config({"model": MODEL}))
        if not a.skip_swarm:
            steps = max(10, a.steps // 2)
            no_ckpt = {"train.checkpoint_every": 1000}  # only the final checkpoint, after the measured rounds
            results["rounds"] = [
                outer_round(tmp, "diloco-state-gpu", {"optim.algorithm": "diloco"}, steps, 4),
                outer_round(tmp, "diloco-state-cpu", {"optim.algorithm": "diloco", "optim.outer_state_device": "cpu"},
                            steps, 4),
                outer_round(tmp, "co2", {"optim.algorithm": "co2"}, steps, 4),
                outer_round(tmp, "diloco-no-ckpt", {"optim.algorithm": "diloco", **no_ckpt}, steps, 4),
                outer_round(tmp, "co2-no-ckpt", {"optim.algorithm": "co2", **no_ckpt}, steps, 4),
            ]
    print(f"\n{card} x{results['gpus']}, torch {results['torch']}")
    print(f"{'inner steps':<20}{'eager tok/s':>13}{'compiled tok/s':>16}{'loco tok/s':>13}{'loco/compiled':>15}")
    for precision in [p for p in ("bf16", "fp32") if f"throughput_{p}" in results]:
        t = results[f"throughput_{precision}"]
        print(f"{'GPT 86M, ' + precision:<20}{t['plain_eager']:>13,.0f}{statistics.median(t['plain']):>16,.0f}"
              f"{statistics.median(t['daemon']):>13,.0f}{t['ratio']:>15.3f}   (medians of "
              f"{len(t['plain'])} plain: {', '.join(f'{v:,.0f}' for v in t['plain'])}; "
              f"{len(t['daemon'])} daemon: {', '.join(f'{v:,.0f}' for v in t['daemon'])})")
    p = results.get("pieces")
    if p:
        print(f"\nmodel {p['params_m']:.1f}M params: device-to-host {p['d2h_s'] * 1e3:.1f} ms "
              f"({p['gb_per_s_d2h']:.1f} GB/s), host-to-device {p['h2d_s'] * 1e3:.1f} ms, "
              f"outer step {p['outer_step_s'] * 1e3:.1f} ms; staging buffers allocated: {p['allocations']}")
    for r in results.get("rounds", []):
        for n in r["nodes"]:
            print(f"{r['name']:<20} {n['device']:<8} blocked {n['blocked_s']:.3f} s/round, compute "
                  f"{n['compute_s']:.2f} s/round, peak GPU mem {n['gpu_mem_gb']:.2f} GB, sync "
                  f"{n['sync_mb']:.0f} MB, reduce s {n['reduce_s']}, wall {n['wall_s']:.3f} s/round, "
                  f"utilization {n['utilization']:.3f}")
            print(" " * 21 + "between rounds (s): " + ", ".join(f"{k} {v:.3f}" for k, v in n["between_s"].items()))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
