"""16-bit floats. fp16 saturates at ±65504 instead of overflowing to ±inf (a collective
would reject an infinite part); bf16 keeps float32's range with 8 bits of mantissa.
Error bound: |x − x̂| ≤ |x|·2⁻¹¹ (fp16, |x| ≥ 6.1e−5; below, an absolute 2⁻²⁵) and
|x|·2⁻⁸ (bf16), plus the saturation for fp16."""

from __future__ import annotations

from typing import Any

import torch

from .base import expect

FP16_MAX = 65504.0


class HalfCodec:
    lossy = True
    level = 16

    def __init__(self, dtype: torch.dtype = torch.float16):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"HalfCodec takes float16 or bfloat16, not {dtype}")
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"

    def encode(self, x: torch.Tensor, shape: tuple[int, int] = (0, 0)) -> tuple[list[torch.Tensor], dict[str, Any]]:
        if self.dtype == torch.float16:
            x = x.clamp(-FP16_MAX, FP16_MAX)
        return [x.to(self.dtype)], {}

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int,
               shape: tuple[int, int] = (0, 0)) -> torch.Tensor:
        expect(tensors, [(self.dtype, numel)], self.name)
        return tensors[0].to(torch.float32)

    def wire_bytes(self, numel: int, shape: tuple[int, int] = (0, 0)) -> int:
        return 2 * numel
