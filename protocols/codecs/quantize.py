"""Integer quantization with one float32 scale per block (2 to 8 bits; int8, int4 and
int2 by name, any width in between as an L-GreCo level).

Per block of ``block`` elements: scale = max|x| / qmax, q = round(x / scale) in
[−qmax, qmax] (qmax = 2^(bits−1) − 1: 127, 7, 1), packed into a bit stream of
``bits`` bits per value (ceil(n·bits/8) bytes).
Error bound per element: |x − x̂| ≤ scale / 2 = max|x_block| / (2·qmax), plus the
float32 rounding of x / scale (~2⁻²³·|x|). A block whose
scale underflows to 0 (all |x| < ~1e−45) decodes as zeros. Scales go on the wire as
float32 (4 bytes per block: 1.6% on top of int8 at block 256).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import quantize_cuda
from .base import CodecError, expect

_BITS = (2, 3, 4, 5, 6, 7, 8)
_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits -> a little-endian bit stream, ceil(n·bits/8) bytes."""
    if bits == 8:
        return codes
    if bits in (2, 4):  # whole codes per byte: shifts instead of a bit-level expansion
        per = 8 // bits
        pad = (-codes.numel()) % per
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        grid = codes.view(-1, per)
        packed = grid[:, 0].clone()
        for i in range(1, per):
            packed |= grid[:, i] << (bits * i)
        return packed
    stream = ((codes[:, None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.view(-1, 8) * _WEIGHTS.to(codes.device)).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return packed[:n]
    if bits in (2, 4):
        per, mask = 8 // bits, (1 << bits) - 1
        return torch.stack([(packed >> (bits * i)) & mask for i in range(per)], dim=1).reshape(-1)[:n]
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.uint8)
    return (stream.view(n, bits) * weights).sum(1, dtype=torch.uint8)


class BlockQuantCodec:
    lossy = True

    def __init__(self, bits: int = 8, block: int = 256):
        if bits not in _BITS:
            raise ValueError(f"bits must be one of {_BITS}, got {bits}")
        if block < 1:
            raise ValueError(f"block size must be positive, got {block}")
        self.bits, self.block = bits, block
        self.level = bits
        self.qmax = 2 ** (bits - 1) - 1
        self.name = f"int{bits}"

    def _sizes(self, numel: int) -> tuple[int, int]:
        return math.ceil(numel / self.block), math.ceil(numel * self.bits / 8)

    def encode(self, x: torch.Tensor, shape: tuple[int, int] = (0, 0)) -> tuple[list[torch.Tensor], dict[str, Any]]:
        tensors, meta, _ = self.encode_decoded(x, shape)
        return tensors, meta

    def encode_decoded(self, x: torch.Tensor, shape: tuple[int, int] = (0, 0)
                       ) -> tuple[list[torch.Tensor], dict[str, Any], torch.Tensor]:
        """:meth:`encode`, plus what :meth:`decode` will rebuild from it, bit for bit (the
        same products q·scale), without unpacking and checking the codes again: error
        feedback needs it for every piece, and a second pass over the data halved encoding."""
        n = x.numel()
        blocks, _ = self._sizes(n)
        if n == blocks * self.block:  # whole blocks (most layers): no padded copy
            grid = x.reshape(blocks, self.block)
        else:
            grid = x.new_zeros(blocks * self.block)
            grid[:n] = x
            grid = grid.view(blocks, self.block)
        # divided by a tensor, not a Python number: CUDA divides by a number through its
        # reciprocal (other bits than the CPU's true division, and qmax = 127 or 7 has no
        # exact reciprocal); tensor by tensor is true division on both
        scale = grid.abs().amax(dim=1).div_(grid.new_full((), self.qmax))
        # on a GPU the branch-free form (the same bits) spares a host sync per piece
        every_block = x.device.type == "cpu" and bool((scale > 0).all())
        safe = scale if every_block else torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.div(grid, safe[:, None]).round_().clamp_(-self.qmax, self.qmax)
        if not every_block:  # all-zero (or non-finite) blocks send code 0 (value 0)
            q = torch.where(scale[:, None] > 0, q, torch.zeros_like(q))
        codes = q.add_(self.qmax + 1).reshape(-1)[:n].to(torch.uint8)  # 1 .. 2·qmax+1: 0 is never valid
        # back to exactly the receiver's q (codes − offset): a −0.0 from rounding becomes +0.0
        # there, and replicas compare their weights' bytes
        decoded = torch.mul(q.sub_(self.qmax + 1), scale[:, None]).reshape(-1)[:n]
        return [_pack(codes, self.bits), scale], {"block": self.block}, decoded

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether :meth:`encode_fused` can encode ``x`` (see :mod:`.quantize_cuda`)."""
        return quantize_cuda.available(x, self.bits, self.block)

    def encode_fused(self, x: torch.Tensor, residual: torch.Tensor | None, work: torch.Tensor | None,
                     decoded: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """:meth:`encode_decoded` of ``x + residual`` in one GPU kernel, the same bits: the
        decoded values go to ``decoded``, the new remainder (x + residual − decoded) to ``work``."""
        packed, scale = quantize_cuda.encode(x, residual, work, decoded, self.bits, self.block)
        return [packed, scale], {"block": self.block}

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int,
               shape: tuple[int, int] = (0, 0)) -> torch.Tensor:
        if meta.get("block") != self.block:
            raise CodecError(f"{self.name}: block size {meta.get('block')!r}, expected {self.block}")
        blocks, nbytes = self._sizes(numel)
        expect(tensors, [(torch.uint8, nbytes), (torch.float32, blocks)], self.name)
        codes, scale = tensors
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError(f"{self.name}: scales must be finite and non-negative")
        codes = _unpack(codes, self.bits, numel)
        if numel and (int(codes.min()) < 1 or int(codes.max()) > 2 * self.qmax + 1):
            raise CodecError(f"{self.name}: code outside [1, {2 * self.qmax + 1}]")
        q = codes.to(torch.float32) - (self.qmax + 1)
        padded = torch.zeros(blocks * self.block, dtype=torch.float32)
        padded[:numel] = q
        return (padded.view(blocks, self.block) * scale[:, None]).reshape(-1)[:numel]

    def wire_bytes(self, numel: int, shape: tuple[int, int] = (0, 0)) -> int:
        blocks, nbytes = self._sizes(numel)
        return nbytes + 4 * blocks
