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


def as_layers(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A communicator's result shaped like ``like``: either one tensor per layer already,
    or a single flat vector to cut up (views either way)."""
    if len(tensors) == len(like):
        return [t.reshape(x.shape) for t, x in zip(tensors, like, strict=True)]
    if len(tensors) == 1:
        return split_like(tensors[0].reshape(-1), like)
    raise ValueError(f"expected {len(like)} tensors or one flat vector, got {len(tensors)}")
