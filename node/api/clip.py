"""Gradient clipping whose coefficient every layout of the same gradients computes alike.

Under DDP across nodes every node applies the same averaged gradient, and their weights stay
bit-identical only if their clip coefficients do too; but ``clip_grad_norm_`` adds float32
norms in an order that depends on how the gradients are laid out (whole tensors in one
process, FSDP shards summed over the ranks), so a sharded node and a one-process node got
coefficients a few ulps apart and parted ways at every step. Here the norm is a float64 sum
of squares over every rank's shards, rounded to 16 significant bits (``loco.optim.norms``),
computed on the device without waiting for it. A loop of its own under ``loco.DDP``
calls ``loco.clip_gradients`` where it called ``clip_grad_norm_`` (the daemon does).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from loco.optim.norms import rounded_on_device

from .ranks import is_dtensor


@torch.no_grad()
def clip_gradients(params: list[torch.Tensor], max_norm: float) -> None:
    """Scale the gradients of ``params`` (whole or sharded: DTensors) by
    min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ the layout-independent norm of all of them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    sharded = [g for g in grads if is_dtensor(g)]
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    norms = torch._foreach_norm(local, 2, dtype=torch.float64)  # (float64 accumulation, no float64 copies)
    squares = torch.stack(norms).square().sum()
    if sharded:  # every rank's shards
        dist.all_reduce(squares, group=sharded[0].device_mesh.get_group())
    norm = rounded_on_device(squares.sqrt())
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(torch.float32)
    torch._foreach_mul_(local, coefficient)
