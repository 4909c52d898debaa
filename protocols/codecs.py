"""Tensor codecs: what a collective does to a tensor before it leaves and after it arrives.

The shape follows hivemind's compression strategies: a codec turns one float32 tensor
into a list of tensors that go on the wire plus a small msgpack-able ``meta`` map, and
back. Collectives always accumulate in float32 after decoding, whatever went over the
wire. Byte counts are taken at the socket by the transport, so a codec never needs to
estimate them; :meth:`Codec.wire_bytes` is for planning only.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class CodecError(ValueError):
    """Payload and metadata do not agree; the part is dropped, never used."""


class Codec(Protocol):
    name: str

    def encode(self, tensor: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """``tensor``: 1-D float32. Returns the wire tensors and their metadata."""
        ...

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int) -> torch.Tensor:
        """Rebuild a 1-D float32 tensor of ``numel`` elements, or raise CodecError."""
        ...


class IdentityCodec:
    """No compression: the float32 buffer itself is sent, zero-copy."""

    name = "none"

    def encode(self, tensor: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [tensor], {}

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], numel: int) -> torch.Tensor:
        if len(tensors) != 1:
            raise CodecError(f"identity codec expects 1 tensor, got {len(tensors)}")
        (t,) = tensors
        if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != numel:
            raise CodecError(
                f"expected float32[{numel}], got {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            )
        return t

    def wire_bytes(self, numel: int) -> int:
        return 4 * numel


def make_codec(name: str) -> Codec:
    if name == "none":
        return IdentityCodec()
    raise ValueError(f"unknown codec {name!r}; available: none")
