"""The outer SGD step shared by DiLoCo and Streaming DiLoCo, and the result both report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .communicator import ReduceResult


@dataclass
class OuterStepResult:
    applied: bool
    group_size: int
    delta_norm: float
    reduce: ReduceResult | None = None  # the communicator's answer, for the caller's bookkeeping
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm-specific metrics


@torch.no_grad()
def nesterov_sgd_step(
    anchor: Sequence[torch.Tensor], buf: Sequence[torch.Tensor], delta: Sequence[torch.Tensor],
    lr: float, momentum: float, nesterov: bool, first: bool,
) -> None:
    """φ ← φ − η·(Δ + μ·buf) after buf ← μ·buf + Δ (without Nesterov: φ ← φ − η·buf).

    Same operations, in the same order, as torch.optim.SGD(momentum, nesterov,
    dampening=0), so results match it bit for bit (tested); ``first`` initializes the
    buffer to Δ the way torch does."""
    for a, b, d in zip(anchor, buf, delta, strict=True):
        d = d.to(a.device)
        if momentum:
            if first:
                b.copy_(d)
            else:
                b.mul_(momentum).add_(d)
            step = d.add(b, alpha=momentum) if nesterov else b
        else:
            step = d
        a.add_(step, alpha=-lr)
