"""DiLoCo outer optimizer (Douillard et al. 2023), docs/ALGORITHMS.md section 1.

    every replica i:   θ_i ← φ;  H inner steps  →  θ_i
    Δ    = mean_i (φ − θ_i)          # pseudo-gradient: OLD minus NEW (the sign trap)
    buf  = μ·buf + Δ
    φ    ← φ − η·(Δ + μ·buf)         # Nesterov; without Nesterov: φ ← φ − η·buf
    θ_i  ← φ

φ (the anchor) and buf live in float32 whatever the model's dtype. Every member of a
round applies the same Δ to the same φ and buf, so replicas stay bit-identical; a round
that does not complete changes nothing (θ keeps training, the next Δ spans both rounds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .communicator import Communicator
from .flat import as_layers, split_like
from .outer import OuterStepResult, nesterov_sgd_step


class DiLoCo:
    STATE_SECTIONS = ("anchor", "buf")  # the state kept per weight, in synchronized_tensors' order
    STEPS_KEY = "outer_steps"  # the outer steps taken, in ``state_dict``

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        comm: Communicator,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        state_device: torch.device | str | None = None,
    ):
        """``state_device``: where φ, the momentum and Δ live (default: the parameters'
        device). On the CPU while the parameters are on a GPU, they use pinned memory and θ
        is copied out through one pinned buffer reused every round."""
        self.params = list(params)
        self.comm = comm
        self.outer_lr = outer_lr
        self.momentum = momentum
        self.nesterov = nesterov
        param_device = self.params[0].device if self.params else torch.device("cpu")
        device = torch.device(state_device) if state_device is not None else param_device
        pinned = device.type == "cpu" and param_device.type == "cuda"
        numel = sum(p.numel() for p in self.params)

        def flat() -> torch.Tensor:
            return torch.empty(numel, dtype=torch.float32, device=device, pin_memory=pinned)

        self.anchor = split_like(flat(), self.params)  # φ
        for a, p in zip(self.anchor, self.params, strict=True):
            a.copy_(p.detach())
        self.buf = [torch.zeros_like(a) for a in self.anchor]
        self.outer_steps = 0
        self.span = 1  # rounds Δ covers: one more for each outer step that found no group
        # Δ lives in one flat buffer reused every round: the collective sends it as it is,
        # without a concatenation copy, and no model-sized allocation happens per round
        self._delta = flat()
        self._delta_views = split_like(self._delta, self.anchor)
        self._theta = split_like(flat(), self.params) if device != param_device else None  # θ staged

    def settings(self) -> dict[str, Any]:
        """The update rule's hyperparameters (another instance built with them applies the
        same rule: a member's ranks each over their own region of the weights)."""
        return {"outer_lr": self.outer_lr, "momentum": self.momentum, "nesterov": self.nesterov}

    @torch.no_grad()
    def pseudo_gradient(self) -> list[torch.Tensor]:
        """Δ_i = φ − θ_i (old minus new), in float32; views of one flat buffer."""
        if self._theta is not None:  # θ to the state's device through the reused buffer
            for t, p in zip(self._theta, self.params, strict=True):
                t.copy_(p.detach(), non_blocking=True)
            if self.params[0].is_cuda:
                torch.cuda.current_stream(self.params[0].device).synchronize()
        thetas = self._theta if self._theta is not None else [p.detach() for p in self.params]
        for d, a, t in zip(self._delta_views, self.anchor, thetas, strict=True):
            torch.sub(a, t.to(torch.float32), out=d)
        return self._delta_views

    @torch.no_grad()
    def apply(self, delta: Sequence[torch.Tensor]) -> None:
        """The outer Nesterov-SGD step with an averaged Δ, then θ ← φ.

        Same operations, in the same order, as torch.optim.SGD(momentum, nesterov,
        dampening=0), so results match it bit for bit (tested)."""
        nesterov_sgd_step(self.anchor, self.buf, delta, self.outer_lr, self.momentum, self.nesterov,
                          first=self.outer_steps == 0)
        self.outer_steps += 1
        self.span = 1
        self.reset_params()

    @torch.no_grad()
    def reset_params(self) -> None:
        for p, a in zip(self.params, self.anchor, strict=True):
            p.copy_(a)

    def outer_step(self, round: int) -> OuterStepResult:
        self.pseudo_gradient()
        norm = float(self._delta.norm())
        # one view per layer of the flat Δ buffer: the communicator sees the layer shapes
        # (compression works per layer) and can still send the buffer without a copy
        result = self.comm.all_reduce_mean(self._delta_views, round, span=self.span)
        if result.tensors is None:  # θ trains on from here: the next Δ spans this round too
            self.span += 1
            return OuterStepResult(False, result.group_size, norm, result)
        self.apply(as_layers(result.tensors, self.anchor))
        return OuterStepResult(True, result.group_size, norm, result)

    # ------------------------------------------------------------ state
    def synchronized_tensors(self) -> list[torch.Tensor]:
        """What must be identical on every replica: φ then the momentum buffers."""
        return [*self.anchor, *self.buf]

    def load_synchronized(
        self, tensors: Sequence[torch.Tensor], outer_steps: int, reset_params: bool = True
    ) -> None:
        """Adopt a peer's φ and momentum (resync, late join); by default also θ ← φ."""
        n = len(self.anchor)
        if len(tensors) != 2 * n:
            raise ValueError(f"expected {2 * n} tensors (anchor + momentum), got {len(tensors)}")
        for dst, src in zip([*self.anchor, *self.buf], tensors, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"shape mismatch: local {tuple(dst.shape)}, received {tuple(src.shape)}")
            dst.copy_(src)
        self.outer_steps = outer_steps
        self.span = 1
        if reset_params:
            self.reset_params()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self.anchor], "buf": [b.clone() for b in self.buf],
                "outer_steps": self.outer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint; θ is restored separately (it holds mid-round progress)."""
        self.load_synchronized([*state["anchor"], *state["buf"]], int(state["outer_steps"]),
                               reset_params=False)
