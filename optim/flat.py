"""Views of one flat float32 buffer shaped like a list of tensors (no copies)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views
