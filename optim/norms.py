"""Norms that every layout of the same numbers computes alike: members that shard a model
differently (FSDP over 2 ranks, one process) or hold it on another device must reach the
same bits where a norm decides an update (CO2's gap-aware penalty, a gradient clip
coefficient under DDP across members).

A norm is the square root of a float64 sum of squares (a float32 square is exact in
float64; summed chunk by chunk, never a float64 copy of a whole tensor), rounded to
``NORM_BITS`` significant bits. Summing pieces cut elsewhere, in another order or on a GPU
changes a float64 sum by about 1e-15 relative, so two layouts' rounded norms differ only
where the sum lies that close to a rounding boundary (about once in 10^10 norms); a replica
that then differs resyncs from a peer like after any divergence.
"""

from __future__ import annotations

import math

import torch

NORM_BITS = 16  # significant bits a norm keeps
CHUNK = 1 << 20  # elements squared in float64 at a time


def squares64(flat: torch.Tensor) -> torch.Tensor:
    """Σx² of a float tensor in float64 (a 0-d tensor on its device), chunk by chunk."""
    flat = flat.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start:start + CHUNK].to(torch.float64)
        total += torch.dot(chunk, chunk)
    return total


def rounded(x: float, bits: int = NORM_BITS) -> float:
    """``x`` rounded to ``bits`` significant bits."""
    if x == 0 or not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(x)
    return math.ldexp(round(math.ldexp(mantissa, bits)), exponent - bits)


def rounded_on_device(x: torch.Tensor, bits: int = NORM_BITS) -> torch.Tensor:
    """``rounded`` of a float tensor, elementwise on its device (no host sync)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(bits))), exponent - bits)
