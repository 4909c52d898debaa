"""PowerSGD low-rank compression (Vogels et al. 2019): one power iteration, warm-started.

A piece of a layer is viewed as a (rows, cols) matrix M. With Q (cols × r) kept from the
last round for the same piece (random, seeded, the first time)::

    P = orthonormalize(M·Q)      (rows × r)
    Q = Mᵀ·P                     (cols × r)       M̂ = P·Qᵀ

P and Q go on the wire as float32: 4·r·(rows + cols) bytes instead of 4·rows·cols. Where
that is not smaller (vectors, tiny or partial-row pieces, r ≥ min(rows, cols)) the piece
is sent dense. The error has no fixed bound (it is what the rank cannot hold); error
feedback carries it to the next round, and the warm start makes repeated rounds converge
to the leading subspace (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import CodecError, expect


class PowerSGDCodec:
    lossy = True
    needs_rows = True  # pieces must cover whole rows of a layer's matrix view

    def __init__(self, rank: int = 4, seed: int = 0):
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank = rank
        self.level = rank
        self.seed = seed
        self.name = "powersgd"
        self._q: dict[tuple[Any, ...], torch.Tensor] = {}  # warm starts, per piece

    def _low_rank(self, shape: tuple[int, int]) -> bool:
        rows, cols = shape
        return rows * cols > 0 and self.rank < min(rows, cols) and self.rank * (rows + cols) < rows * cols

    def encode(self, x: torch.Tensor, shape: tuple[int, int] = (0, 0),
               key: tuple[Any, ...] | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
        rows, cols = shape
        if rows * cols != x.numel() or not self._low_rank(shape):
            return [x], {"mode": "dense"}
        m = x.view(rows, cols)
        key = (key, rows, cols)
        q = self._q.get(key)
        if q is None:
            g = torch.Generator().manual_seed(self.seed + rows * 1_000_003 + cols)
            q = torch.randn(cols, self.rank, generator=g)
        p = m @ q
        p, _ = torch.linalg.qr(p, mode="reduced")
        q = m.T @ p
        self._q[key] = q
        return [p.reshape(-1).contiguous(), q.reshape(-1).contiguous()], {"mode": "lowrank", "rank": self.rank}

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int,
               shape: tuple[int, int] = (0, 0)) -> torch.Tensor:
        mode = meta.get("mode")
        if mode == "dense":
            expect(tensors, [(torch.float32, numel)], self.name)
            return tensors[0]
        if mode != "lowrank":
            raise CodecError(f"powersgd: unknown mode {mode!r}")
        rows, cols = shape
        if meta.get("rank") != self.rank or rows * cols != numel or not self._low_rank(shape):
            raise CodecError(f"powersgd: rank {meta.get('rank')!r} for a {rows}x{cols} piece of {numel} elements")
        expect(tensors, [(torch.float32, rows * self.rank), (torch.float32, cols * self.rank)], self.name)
        p, q = tensors[0].view(rows, self.rank), tensors[1].view(cols, self.rank)
        return (p @ q.T).reshape(-1)

    def wire_bytes(self, numel: int, shape: tuple[int, int] = (0, 0)) -> int:
        rows, cols = shape
        if rows * cols == numel and self._low_rank(shape):
            return 4 * self.rank * (rows + cols)
        return 4 * numel

    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: q.clone() for k, q in self._q.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._q = dict(state.get("q", {}))
