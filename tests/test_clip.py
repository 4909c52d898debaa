"""Gradient clipping whose coefficient does not depend on how the gradients are laid out
(``loco.clip_gradients``): what keeps a sharded DDP node and a one-process one bit-identical."""

from __future__ import annotations

import math

import torch

from loco import clip_gradients


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def test_the_clip_is_a_float64_norm_rounded_to_16_bits_and_the_same_however_the_gradients_are_cut():
    gen = torch.Generator().manual_seed(0)
    whole = [torch.randn(300, 70, generator=gen) * 0.3, torch.randn(70, generator=gen)]
    # the same numbers cut elsewhere (a layout of regions or shards), in another order
    flat = torch.cat([g.reshape(-1) for g in whole])
    cuts = [flat[20_000:], flat[:7], flat[7:20_000]]
    a, b = _params(whole), _params(cuts)
    clip_gradients(a, 1.0)
    clip_gradients(b, 1.0)
    clipped_a = torch.cat([p.grad.reshape(-1) for p in a])
    clipped_b = torch.cat([b[1].grad, b[2].grad, b[0].grad])
    assert torch.equal(clipped_a, clipped_b)
    # by hand: the float64 norm of all of them, 16 significant bits, torch's coefficient
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in whole))
    mantissa, exponent = math.frexp(norm)
    norm = math.ldexp(round(mantissa * 2 ** 16), exponent - 16)
    scale = torch.tensor(min(1.0, 1.0 / (norm + 1e-6)), dtype=torch.float32)
    assert norm > 1 and torch.equal(clipped_a, flat * scale)
    # under the limit nothing changes
    small = _params([g * 1e-4 for g in whole])
    clip_gradients(small, 1.0)
    assert all(torch.equal(p.grad, g * 1e-4) for p, g in zip(small, whole, strict=True))
