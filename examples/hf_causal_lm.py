"""A HuggingFace transformers causal LM trained with DiLoCo and int8 pseudo-gradients.

The model is built from a small config with random weights (nothing is downloaded); the
data is the Python standard library's own source, read as bytes (a byte-level vocabulary
of 256). Start it twice; the second process joins the first:

    pip install 'loco[hf]'
    python examples/hf_causal_lm.py                     # prints "join with: TOKEN" (the swarm key and its address)
    python examples/hf_causal_lm.py --join TOKEN --seed 2

The lines marked ``# loco`` are what joins the swarm.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sysconfig

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import loco  # loco


def corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    """The standard library's .py files as one byte stream (sorted: the same everywhere)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def append_json(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--join", metavar="TOKEN", help="the join token a member printed (none: start a new swarm)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--inner-steps", type=int, default=50)
    ap.add_argument("--peers", type=int, default=0, help="wait for this many peers before training")
    ap.add_argument("--seed", type=int, default=1, help="this process's data stream")
    ap.add_argument("--run-id", default="hf-causal-lm")
    ap.add_argument("--report", help="write one JSON line per round here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)  # the same random init in every process
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    tokens = corpus()
    split = int(len(tokens) * 0.95)
    train, val = tokens[:split], tokens[split:]
    gen = torch.Generator().manual_seed(args.seed)
    val_batch = torch.stack([val[i:i + 64] for i in range(0, 64 * 16, 64)])

    with loco.Swarm(run_id=args.run_id, join=args.join) as swarm:  # loco
        print("join with:", swarm.join_token, flush=True)
        with loco.DiLoCo(model, opt, swarm, inner_steps=args.inner_steps, outer_lr=0.7,  # loco
                         outer_momentum=0.9, compression="int8", wait_for_peers=args.peers) as outer:  # loco
            for step in range(args.steps):
                starts = torch.randint(0, len(train) - 65, (8,), generator=gen)
                batch = torch.stack([train[s:s + 64] for s in starts])
                model.train()
                loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels itself
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                report = outer.step(final=step == args.steps - 1)  # loco
                if report is None:
                    continue
                model.eval()
                with torch.no_grad():
                    val_loss = model(input_ids=val_batch, labels=val_batch).loss.item()
                print(f"round {report.round}: {report.status} with {report.group_size}, loss {loss.item():.3f} "
                      f"val {val_loss:.3f}, sent {report.round_bytes / 1e6:.2f} MB", flush=True)
                if args.report:
                    append_json(args.report, {"round": report.round, "status": report.status,
                                             "group_size": report.group_size, "val_loss": val_loss,
                                             "weights_hash": report.weights_hash,
                                             "round_bytes": report.round_bytes,
                                             "params": sum(p.numel() for p in model.parameters())})


if __name__ == "__main__":
    main()
