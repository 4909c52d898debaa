"""NoLoCo (Kolehmainen et al. 2025), docs/ALGORITHMS.md section 3: no all-reduce; every outer
step a replica averages with a small random group chosen by the communicator.

For replica i in group G (φ = its slow weights, θ = its weights after H inner steps)::

    φ̄ = mean_{j∈G} φ_j ;  d̄ = mean_{j∈G} (θ_j − φ_j)
    δ_i ← α·δ_i + β·d̄ − γ·(φ_i − φ̄)
    φ_i ← φ_i + δ_i ;  θ_i ← φ_i

Each replica sends [φ_i, θ_i − φ_i] as one flat vector (2× the model) to its partners. A
replica left without partners (timeout, odd node out the communicator could not place)
takes the local-only step: G = {i}, so φ̄ = φ_i and d̄ = its own θ_i − φ_i.

Checks (tested): with every replica in one group and identical φ, α = μ and β = η this is
DiLoCo without Nesterov; with α = γ = 0 and β = 1 it is the average of pseudo-gradients
within the group. Replicas are NOT bit-identical (that is the point): there is no state
hash to agree on, and ``drift`` = ‖φ_i − φ̄‖ (the distance the γ term pulls back, measured
before averaging) shows how far apart they are.

The paper's one-time average of the initial weights is not needed here: every node
initializes the model from the shared seed, so all φ_i start equal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .communicator import GroupCommunicator
from .flat import as_layers, split_like
from .outer import OuterStepResult


class NoLoCo:
    STATE_SECTIONS = ("anchor", "delta")  # the state kept per weight, in synchronized_tensors' order
    STEPS_KEY = "outer_steps"  # the outer steps taken, in ``state_dict``
    NORMS = ("drift",)  # metrics that are L2 norms over the weights (per region: summed in squares)

    def __init__(self, params: Iterable[torch.Tensor], comm: GroupCommunicator, alpha: float = 0.5,
                 beta: float = 0.7, gamma: float = 0.7):
        self.params = list(params)
        self.comm = comm
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.anchor = [p.detach().to(torch.float32).clone() for p in self.params]  # φ_i
        self.delta = [torch.zeros_like(a) for a in self.anchor]  # δ_i
        self.outer_steps = 0
        numel = sum(a.numel() for a in self.anchor)
        device = self.anchor[0].device if self.anchor else "cpu"
        # [φ_i | θ_i − φ_i] in one reused buffer: one message per partner, no per-round allocation
        self._send = torch.empty(2 * numel, dtype=torch.float32, device=device)
        self._phi_views = split_like(self._send[:numel], self.anchor)
        self._d_views = split_like(self._send[numel:], self.anchor)
        self._numel = numel

    def settings(self) -> dict[str, Any]:
        """The update rule's hyperparameters (another instance built with them applies the
        same rule: a member's ranks each over their own region of the weights)."""
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}

    @torch.no_grad()
    def outer_step(self, round: int) -> OuterStepResult:
        for sp, sd, a, p in zip(self._phi_views, self._d_views, self.anchor, self.params, strict=True):
            sp.copy_(a)
            torch.sub(p.detach().to(torch.float32), a, out=sd)
        norm = float(self._send[self._numel:].norm())
        result = self.comm.group_mean([*self._phi_views, *self._d_views], round)
        grouped = result.tensors is not None and result.group_size > 1
        if grouped:
            both = as_layers(result.tensors, [*self.anchor, *self.anchor])
            phi_bar, d_bar = both[:len(self.anchor)], both[len(self.anchor):]
        else:  # local-only step: the group is this replica alone
            phi_bar, d_bar = self._phi_views, self._d_views
        drift_sq = 0.0
        for a, dl, pb, db in zip(self.anchor, self.delta, phi_bar, d_bar, strict=True):
            gap = a - pb.to(a.device)  # φ_i − φ̄
            drift_sq += float(gap.square().sum())
            dl.mul_(self.alpha).add_(db.to(a.device), alpha=self.beta).add_(gap, alpha=-self.gamma)
            a.add_(dl)
        self.outer_steps += 1
        self.reset_params()
        extra = {"partners": [m for m in result.members], "drift": drift_sq ** 0.5}
        return OuterStepResult(grouped, result.group_size if grouped else 1, norm, result, extra)

    @torch.no_grad()
    def reset_params(self) -> None:
        for p, a in zip(self.params, self.anchor, strict=True):
            p.copy_(a)

    # ------------------------------------------------------------ state
    def synchronized_tensors(self) -> list[torch.Tensor]:
        """What a joining replica adopts from a peer: φ and δ."""
        return [*self.anchor, *self.delta]

    def load_synchronized(self, tensors: Sequence[torch.Tensor], outer_steps: int, reset_params: bool = True) -> None:
        n = len(self.anchor)
        if len(tensors) != 2 * n:
            raise ValueError(f"expected {2 * n} tensors (anchor + δ), got {len(tensors)}")
        for dst, src in zip([*self.anchor, *self.delta], tensors, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"shape mismatch: local {tuple(dst.shape)}, received {tuple(src.shape)}")
            dst.copy_(src)
        self.outer_steps = outer_steps
        if reset_params:
            self.reset_params()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self.anchor], "delta": [d.clone() for d in self.delta],
                "outer_steps": self.outer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_synchronized([*state["anchor"], *state["delta"]], int(state["outer_steps"]), reset_params=False)
