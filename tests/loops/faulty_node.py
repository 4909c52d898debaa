"""A node daemon (``loco node start ...``) with one fault built in, as an attacker's or a
broken replica's process would have it:

    python tests/loops/faulty_node.py POISON node start --out ... --node-id ...

POISON: ``x1e6``, ``const1e3``, ``nan``, ``inf`` poison every contribution this node sends
to the all-reduce (its own weights stay honest); ``local_nan:STEP`` makes its own weights
NaN at inner step STEP (a bad batch, a learning-rate spike), once; ``die_sending:KIND``
ends the process at once (as SIGKILL would) when it is about to send its first message of
that kind (e.g. ``PP_STATE``: a pipeline replica dying as it would hand a joiner its stage).
"""

from __future__ import annotations

import os
import sys

import torch

from loco.node import cli
from loco.node.trainer import Trainer
from loco.protocols.collective import GroupAllReduce
from loco.protocols.transport import Transport

POISONS = {
    "x1e6": lambda t: t * 1e6,
    "const1e3": lambda t: torch.full_like(t, 1e3),
    "nan": lambda t: torch.full_like(t, float("nan")),
    "inf": lambda t: t.masked_fill(torch.arange(t.numel()).reshape(t.shape) % 5 == 0, float("inf")),
}


def poison_contributions(kind: str) -> None:
    honest = GroupAllReduce.all_reduce

    def all_reduce(self, round, tensors, *args, **kwargs):
        return honest(self, round, [POISONS[kind](t.detach()) for t in tensors], *args, **kwargs)

    GroupAllReduce.all_reduce = all_reduce


def nan_at(step: int) -> None:
    honest = Trainer.train_step

    def train_step(self, *args, **kwargs):
        loss = honest(self, *args, **kwargs)
        if self.step == step:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return loss

    Trainer.train_step = train_step


def die_sending(kind: str) -> None:
    honest = Transport.send

    def send(self, endpoint, msg):
        if msg.kind == kind:
            os._exit(137)
        return honest(self, endpoint, msg)

    Transport.send = send


def main() -> None:
    fault = sys.argv.pop(1)
    if fault.startswith("local_nan:"):
        nan_at(int(fault.split(":")[1]))
    elif fault.startswith("die_sending:"):
        die_sending(fault.split(":")[1])
    else:
        poison_contributions(fault)
    sys.argv[0] = "loco"
    cli.main()


if __name__ == "__main__":
    main()
