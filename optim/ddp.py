"""Synchronous data parallelism: the gradients of every step are averaged over the group.

The baseline every low-communication method is compared with. Gradients are copied into
one flat float32 buffer (reused every step), averaged through the same Communicator the
outer optimizers use, and copied back; a step whose average did not complete is skipped
by the caller, so the replicas that did complete it stay identical.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .communicator import Communicator
from .flat import as_layers, split_like


class DataParallel:
    def __init__(self, params: Iterable[torch.Tensor], comm: Communicator):
        self.params = list(params)
        self.comm = comm
        numel = sum(p.numel() for p in self.params)
        device = self.params[0].device if self.params else "cpu"
        self._flat = torch.zeros(numel, dtype=torch.float32, device=device)
        self.last_group_size = 0

    @torch.no_grad()
    def sync_gradients(self, round: int) -> bool:
        """Replace every ``p.grad`` by the group mean. False: the average did not complete
        and the gradients are left as they were (the caller skips the step)."""
        views = split_like(self._flat, self.params)
        for v, p in zip(views, self.params, strict=True):
            if p.grad is None:
                v.zero_()
            else:
                v.copy_(p.grad)
        result = self.comm.all_reduce_mean(views, round)
        self.last_group_size = result.group_size
        if result.tensors is None:
            return False
        for v, p in zip(as_layers(result.tensors, self.params), self.params, strict=True):
            if p.grad is None:
                p.grad = v.to(p.dtype).clone()
            else:
                p.grad.copy_(v)
        return True
