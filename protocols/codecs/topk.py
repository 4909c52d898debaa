"""Top-k sparsification: the k = max(1, round(density·n)) largest-magnitude entries of the
piece, as sorted int32 indices and float32 values (8 bytes each). Everything else is
dropped (error feedback keeps it for the next round). Decoding rejects indices that are
out of range, unsorted or repeated: a scatter would silently pick one of the duplicates."""

from __future__ import annotations

from typing import Any

import torch

from .base import CodecError, expect


class TopKCodec:
    lossy = True

    def __init__(self, density: float = 0.01):
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        self.density = density
        self.level = density
        self.name = "topk"

    def k(self, numel: int) -> int:
        return min(numel, max(1, round(self.density * numel))) if numel else 0

    def encode(self, x: torch.Tensor, shape: tuple[int, int] = (0, 0)) -> tuple[list[torch.Tensor], dict[str, Any]]:
        k = self.k(x.numel())
        idx = torch.topk(x.abs(), k, sorted=False).indices.sort().values
        return [idx.to(torch.int32), x[idx]], {"k": k}

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int,
               shape: tuple[int, int] = (0, 0)) -> torch.Tensor:
        k = meta.get("k")
        if k != self.k(numel):
            raise CodecError(f"topk: k={k!r} for {numel} elements at density {self.density}, expected {self.k(numel)}")
        expect(tensors, [(torch.int32, k), (torch.float32, k)], self.name)
        idx, values = tensors
        idx = idx.to(torch.int64)
        if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
            raise CodecError(f"topk: indices must be strictly increasing within [0, {numel})")
        out = torch.zeros(numel, dtype=torch.float32)
        out[idx] = values
        return out

    def wire_bytes(self, numel: int, shape: tuple[int, int] = (0, 0)) -> int:
        return 8 * self.k(numel)
