"""The daemon's own model, data and inner steps (its ``Trainer``), driven by a user-style
loop over the public library API instead of the daemon: the one-code-path check. Prints
the weights hash of every round as JSON."""

from __future__ import annotations

import argparse
import json

import torch

import loco
from loco.node.config import load_config
from loco.node.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--node-id", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(None, args.overrides)
    if cfg.node.threads:  # (the daemon does the same: float sums depend on the thread count)
        torch.set_num_threads(cfg.node.threads)
    trainer = Trainer(cfg, args.node_id)
    o = cfg.optim
    hashes = []
    with loco.Swarm(run_id="twin", node_id=args.node_id) as swarm, \
            loco.DiLoCo(trainer.model, trainer.opt, swarm, inner_steps=o.inner_steps, outer_lr=o.outer_lr,
                        outer_momentum=o.outer_momentum, compression=cfg.compression, seed=cfg.train.seed) as outer:
        while len(hashes) < args.rounds:
            trainer.train_step()
            report = outer.step()
            if report is not None:
                hashes.append(report.weights_hash)
    print(json.dumps({"hashes": hashes}))


if __name__ == "__main__":
    main()
