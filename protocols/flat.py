"""One flat float32 vector from a list of tensors, without a copy when they already are
consecutive views of one buffer (how loco's optimizers hand over their state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def flat_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-D float32 CPU vector holding ``tensors`` end to end. A view (no copy) when they
    are contiguous float32 CPU views laid back to back in one storage; a new tensor otherwise."""
    ts = [t.detach() for t in tensors]
    if ts and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts):
        storage = ts[0].untyped_storage().data_ptr()
        expected = ts[0].data_ptr()
        ok = True
        for t in ts:
            if t.untyped_storage().data_ptr() != storage or t.data_ptr() != expected:
                ok = False
                break
            expected += 4 * t.numel()
        if ok:
            total = sum(t.numel() for t in ts)
            return torch.as_strided(ts[0], (total,), (1,))
    return torch.cat([t.reshape(-1).to(torch.float32, copy=False).cpu() for t in ts]) if ts else torch.empty(0)


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like``."""
    return shaped_views(flat, [t.shape for t in like])


def shaped_views(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Views of ``flat``, end to end, of the given shapes."""
    out, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        out.append(flat[offset:offset + n].view(tuple(shape)))
        offset += n
    return out
