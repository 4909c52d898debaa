"""Inner-step throughput of a built-in GPT preset: a plain PyTorch loop vs the `loco` daemon.

Both train the same model (``model.preset``, default gpt2-124m: 124M parameters, GPT-2's
vocabulary) on the same device, batch, window and precision, with the same data sampler:

1. the plain loop in this process: forward, cross-entropy, backward, clip, AdamW step;
2. a real ``loco node start`` daemon (its DHT, transport and membership threads running),
   two rounds of ``--steps`` inner steps: tokens / compute time of the second round (the
   first pays for start-up), from its metrics;
3. the plain loop again (the machine's drift between the two).

Ratio = daemon / mean(plain). Runs on CUDA when there is a GPU, else on the CPU
(``--device`` chooses); on a small CPU use a shorter ``--block`` and ``--batch``.

    python scripts/bench_model.py --device cpu --block 256 --batch 2 --steps 4
    python scripts/bench_model.py --device cuda --precision bf16 --batch 16 --steps 30
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

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loco.node.config import build_config  # noqa: E402
from loco.node.data import Sampler, load_corpus, node_seed  # noqa: E402
from loco.node.devices import resolve_device  # noqa: E402
from loco.node.metrics import read_metrics  # noqa: E402
from loco.node.model import GPT, unique_parameters  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def plain_loop(cfg, steps: int, warmup: int, compiled: bool = False) -> float:
    """tokens/s of the textbook loop (the trainer's optimizer settings); ``compiled``: what a
    performance-minded user runs on a GPU (torch.compile of the model, fused AdamW, batches
    from pinned memory)."""
    dev = resolve_device(cfg.node.device)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(dev)
    params = unique_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=compiled or None)
    step_model = torch.compile(model) if compiled else model
    train, _ = load_corpus(cfg.data)
    sampler = Sampler(train, cfg.model.block_size, cfg.data.batch_size, node_seed(0, "plain"))
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    t0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(dev)
            t0 = time.perf_counter()
        x, y = sampler.next_batch()
        if compiled and dev.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with amp:
            logits = step_model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    _sync(dev)
    dt = time.perf_counter() - t0
    del model, opt, step_model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return steps * cfg.data.batch_size * cfg.model.block_size / dt


def daemon_tokens_per_s(tmp: Path, sets: dict, steps: int) -> float:
    out = tmp / "daemon"
    args = ["node", "start", "--node-id", "node0", "--out", str(out), "--set", "swarm.insecure=true"]
    for k, v in {**sets, "optim.inner_steps": steps, "train.rounds": 2, "train.log_every": 10_000,
                 "optim.warmup_steps": 0, "data.val_batches": 1}.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    log = tmp / "daemon.log"
    with log.open("w") as f:
        p = subprocess.run([sys.executable, "-m", "loco.node.cli", *args], cwd=REPO, stdout=f,
                           stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=3000)
    if p.returncode:
        sys.exit(f"the daemon failed:\n{log.read_text()[-3000:]}")
    rounds = [r for r in read_metrics(out / "metrics" / "node0.jsonl") if r["event"] == "outer"]
    last, prev = rounds[-1], rounds[-2]
    return (last["tokens"] - prev["tokens"]) / last["compute_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2-124m", choices=["tiny", "small", "gpt2-124m"])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--block", type=int, default=0, help="window length (0: the preset's)")
    ap.add_argument("--steps", type=int, default=20, help="timed inner steps per measurement")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    model = {"preset": a.preset, **({"block_size": a.block} if a.block else {})}
    sets = {"model.preset": a.preset, **({"model.block_size": a.block} if a.block else {}),
            "data.batch_size": a.batch, "train.precision": a.precision, "node.device": a.device}
    cfg = build_config({"model": model, "data": {"batch_size": a.batch}, "train": {"precision": a.precision},
                        "node": {"device": a.device}})
    dev = resolve_device(a.device)
    with torch.device("meta"):
        params = sum(p.numel() for p in unique_parameters(GPT(cfg.model)))
    with tempfile.TemporaryDirectory() as d:
        before = plain_loop(cfg, a.steps, warmup=2)
        daemon = daemon_tokens_per_s(Path(d), sets, a.steps)
        after = plain_loop(cfg, a.steps, warmup=2)
    plain = (before + after) / 2
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    results = {"device": where, "torch": torch.__version__, "preset": a.preset, "params": params,
               "batch": a.batch, "block": cfg.model.block_size, "precision": a.precision, "steps": a.steps,
               "plain_before": before, "daemon": daemon, "plain_after": after, "ratio": daemon / plain}
    print(f"\n{where}, torch {torch.__version__}: {a.preset} ({params / 1e6:.1f}M parameters), batch {a.batch} x "
          f"{cfg.model.block_size}, {a.precision}, {a.steps} steps")
    print(f"{'plain tok/s (before, after)':<32}{'loco daemon tok/s':>20}{'ratio':>8}")
    print(f"{f'{plain:,.0f} ({before:,.0f}, {after:,.0f})':<32}{daemon:>20,.0f}{daemon / plain:>8.3f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
