"""A user-style model factory for tests of model.factory."""

from __future__ import annotations

import torch


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 16)
        self.out = torch.nn.Linear(16, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(idx))


def tiny_lm() -> torch.nn.Module:
    return TinyLM()


def not_a_model() -> object:
    return object()
