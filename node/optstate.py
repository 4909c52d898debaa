"""AdamW's per-parameter moments as a flat list of tensors: what a replica hands a peer that
adopts its state (the daemon's DDP resync, a pipeline stage replica that joins)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def adam_tensors(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[exp_avg, exp_avg_sq] of each parameter in order (zeros before the first step)."""
    out = []
    for p in params:
        st = opt.state.get(p, {})
        out += [st.get("exp_avg", torch.zeros_like(p)), st.get("exp_avg_sq", torch.zeros_like(p))]
    return out


def adam_step(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> int:
    states = [opt.state.get(p, {}) for p in params]
    return int(float(states[0].get("step", 0))) if states else 0


@torch.no_grad()
def load_adam(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
              step: int) -> None:
    """Adopt moments laid out as :func:`adam_tensors` returns them."""
    if len(tensors) != 2 * len(params):
        raise ValueError(f"AdamW state has {len(tensors)} tensors, expected {2 * len(params)}")
    for i, p in enumerate(params):
        avg, sq = tensors[2 * i], tensors[2 * i + 1]
        if avg.shape != p.shape or sq.shape != p.shape:
            raise ValueError(f"AdamW moment of shape {tuple(avg.shape)} for a parameter of shape {tuple(p.shape)}")
        opt.state[p] = {"step": step_count(opt, p, step), "exp_avg": avg.to(p.device, copy=True),
                        "exp_avg_sq": sq.to(p.device, copy=True)}


def step_count(opt: torch.optim.Optimizer, p: torch.Tensor, step: int) -> torch.Tensor:
    """AdamW's step count for ``p`` as the optimizer keeps it: fused and capturable AdamW
    keep it on the parameter's device."""
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    return torch.tensor(float(step), device=p.device if on_device else None)
