"""The codec interface: one float32 piece of a tensor in, wire tensors + metadata out.

The shape follows hivemind's compression strategies: a codec turns a 1-D float32 piece
into a list of tensors that go on the wire plus a small msgpack-able ``meta`` map, and
back. ``shape`` is the piece's 2-D view (rows, cols): the layer's leading dimension by
the product of the others, as many rows as the piece holds; only low-rank codecs use it.
Byte counts in the metrics are taken at the socket by the transport; ``wire_bytes`` is
the exact payload size, for planning (L-GreCo) and for the tests.

A new codec is one small file: a class with these members, registered in __init__.py. It
may also offer ``encode_decoded(x, shape) -> (tensors, meta, decoded)``, where ``decoded``
is exactly what ``decode`` would rebuild: error feedback then skips decoding its own output.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class CodecError(ValueError):
    """Payload and metadata do not agree; the part is dropped, never used."""


class Codec(Protocol):
    name: str
    lossy: bool
    level: float | int | None  # bits, density or rank: what L-GreCo varies per layer

    def encode(self, x: torch.Tensor, shape: tuple[int, int]) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """``x``: 1-D float32, contiguous. Returns the wire tensors and their metadata."""
        ...

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int,
               shape: tuple[int, int]) -> torch.Tensor:
        """Rebuild a 1-D float32 tensor of ``numel`` elements, or raise CodecError."""
        ...

    def wire_bytes(self, numel: int, shape: tuple[int, int]) -> int:
        """Exact bytes of the wire tensors for a piece of this size."""
        ...


def expect(tensors: list[torch.Tensor], specs: list[tuple[torch.dtype, int]], codec: str) -> None:
    """Check the wire tensors' count, dtypes and element counts (1-D each)."""
    if len(tensors) != len(specs):
        raise CodecError(f"{codec}: expected {len(specs)} tensors, got {len(tensors)}")
    for i, (t, (dtype, numel)) in enumerate(zip(tensors, specs, strict=True)):
        if t.dtype != dtype or t.dim() != 1 or t.numel() != numel:
            got = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            raise CodecError(f"{codec}: tensor {i} should be {str(dtype).removeprefix('torch.')}[{numel}], got {got}")


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """Any float tensor (any layout) as a contiguous 1-D float32 one; no copy if it is one."""
    return x.detach().reshape(-1).to(torch.float32).contiguous()
