"""L-GreCo (Markov et al. 2024), docs/ALGORITHMS.md section 6: per-layer compression levels
that minimize total bytes while the total compression error stays within the error of
the uniform setting.

For each layer ℓ and candidate level c: e_ℓ(c) = ‖u_ℓ − C_c(u_ℓ)‖² on the layer's recent
update u_ℓ, s_ℓ(c) = the bytes C_c puts on the wire for the whole layer. With the budget
E* = Σ_ℓ e_ℓ(c0) (c0: the configured, uniform level), a dynamic program over a discretized
error axis (steps of E*/bins) finds the least bytes for every error total; the cheapest
plan whose exact error is within E* wins, and the uniform plan is the fallback: the
result never has more error or more bytes than the uniform setting (checked each time).

Which update: the averaged pseudo-gradient of the last outer step. Every peer has the
same one (bit for bit), so every peer computes the same plan without a message.
PowerSGD errors are measured from a cold start (no warm-started Q), which overstates
the error of low ranks a little: conservative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .base import as_float32
from .registry import make_codec


def candidate_levels(family: str, base: Any) -> list[Any]:
    """Levels around the configured one: ±2 bits, ¼..4× the density, ½..2× the rank."""
    if family == "int":
        return sorted({max(2, base - 2), max(2, base - 1), base, min(8, base + 1), min(8, base + 2)})
    if family == "topk":
        return sorted({min(1.0, base * f) for f in (0.25, 0.5, 1.0, 2.0, 4.0)})
    if family == "powersgd":
        return sorted({max(1, base // 2), base, base * 2})
    return [base]


@dataclass
class Plan:
    levels: dict[int, Any]  # layer index -> level
    error: float  # Σ e at the chosen levels
    bytes: int
    uniform_error: float  # E*
    uniform_bytes: int


def layer_tables(family: str, levels: Sequence[Any], layers: Sequence[torch.Tensor], options: dict[str, Any]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """errors[ℓ, c] (squared L2) and bytes[ℓ, c] for every layer and candidate level."""
    errors = np.zeros((len(layers), len(levels)))
    sizes = np.zeros((len(layers), len(levels)), dtype=np.int64)
    for c, level in enumerate(levels):
        codec = make_codec(family, level=level, **options)
        for i, u in enumerate(layers):
            x = as_float32(u)
            shape = (u.shape[0], x.numel() // u.shape[0]) if u.dim() > 1 else (1, x.numel())
            wire, meta = codec.encode(x, shape)
            errors[i, c] = float((x - codec.decode(wire, meta, x.numel(), shape)).double().square().sum())
            sizes[i, c] = codec.wire_bytes(x.numel(), shape)
    return errors, sizes


def solve(errors: np.ndarray, sizes: np.ndarray, base: int, bins: int = 1000) -> tuple[list[int], float, int]:
    """Level index per layer minimizing Σ bytes subject to Σ error ≤ Σ errors[:, base].

    Errors are rounded to units of E*/bins and a DP finds, for every total of units, the
    least bytes reaching exactly that total. Rounding can misjudge a plan by up to half a
    unit per layer, so plans are then taken cheapest first and the first whose exact
    error fits the budget wins; the uniform plan (always within budget) is the fallback."""
    n_layers, n_levels = errors.shape
    uniform = [base] * n_layers
    budget = float(errors[:, base].sum())
    uniform_bytes = int(sizes[:, base].sum())
    if n_layers == 0 or budget <= 0:
        return uniform, budget, uniform_bytes
    units = np.rint(errors / budget * bins).astype(np.int64)
    cap = int(units[:, base].sum()) + n_layers
    inf = np.iinfo(np.int64).max // 4
    dp = np.full(cap + 1, inf, dtype=np.int64)
    dp[0] = 0
    choice = np.zeros((n_layers, cap + 1), dtype=np.int16)
    for ell in range(n_layers):
        new = np.full(cap + 1, inf, dtype=np.int64)
        for c in range(n_levels):
            u = int(units[ell, c])
            if u > cap:
                continue
            cand = np.full(cap + 1, inf, dtype=np.int64)
            cand[u:] = dp[:cap + 1 - u] + sizes[ell, c]
            better = cand < new
            new[better] = cand[better]
            choice[ell, better] = c
        dp = new
    for j in np.argsort(dp, kind="stable"):
        if dp[j] >= inf or dp[j] >= uniform_bytes:
            break
        picks, k = [0] * n_layers, int(j)
        for ell in range(n_layers - 1, -1, -1):
            picks[ell] = int(choice[ell, k])
            k -= int(units[ell, picks[ell]])
        err = float(sum(errors[i, c] for i, c in enumerate(picks)))
        if err <= budget:
            return picks, err, int(dp[j])
    return uniform, budget, uniform_bytes


def make_plan(family: str, base_level: Any, layers: Sequence[torch.Tensor], options: dict[str, Any],
              bins: int = 1000) -> Plan:
    levels = candidate_levels(family, base_level)
    if base_level not in levels:
        levels = sorted({*levels, base_level})
    base = levels.index(base_level)
    errors, sizes = layer_tables(family, levels, layers, options)
    picks, err, nbytes = solve(errors, sizes, base, bins)
    uniform_error = float(errors[:, base].sum())
    if err > uniform_error * (1 + 1e-12):  # the DP's guarantee, checked every time
        raise AssertionError(f"L-GreCo plan error {err} exceeds the uniform error {uniform_error}")
    return Plan({i: levels[c] for i, c in enumerate(picks)}, err, nbytes, uniform_error,
                int(sizes[:, base].sum()))


def plan_digest(levels: dict[int, Any]) -> str:
    """A short text naming a plan (for metrics and cross-peer checks)."""
    import hashlib

    text = ",".join(f"{k}:{levels[k]}" for k in sorted(levels))
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest() if text else "uniform"


__all__ = ["Plan", "candidate_levels", "layer_tables", "make_plan", "plan_digest", "solve"]
