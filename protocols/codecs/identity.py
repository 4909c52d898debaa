"""No compression: the float32 piece itself goes on the wire, zero-copy."""

from __future__ import annotations

from typing import Any

import torch

from .base import expect


class IdentityCodec:
    name = "none"
    lossy = False
    level = None

    def encode(self, x: torch.Tensor, shape: tuple[int, int] = (0, 0)) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [x], {}

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int,
               shape: tuple[int, int] = (0, 0)) -> torch.Tensor:
        expect(tensors, [(torch.float32, numel)], self.name)
        return tensors[0]

    def wire_bytes(self, numel: int, shape: tuple[int, int] = (0, 0)) -> int:
        return 4 * numel
