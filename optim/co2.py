"""CO2 (Sun et al. 2024), docs/ALGORITHMS.md section 4: local updating with the all-reduce of
round t running in the background during round t+1; its result is applied one round late.

At the end of round t (x_t = the anchor the round started from, θ = this replica's
weights after τ inner steps)::

    ḡ_{t−1} = wait for the reduce launched at the end of round t−1   (mean of Δ_{t−1})
    Δ_t     = x_t − θ                     # pseudo-gradient, old minus new
    launch the reduce of Δ_t               (runs while round t+1 computes)
    m       ← β·m + ḡ_{t−1} / λ            # staleness gap penalty, λ ≥ 1
    m       ← clamp(m, −c, c)              # element-wise, IN PLACE (the public code's bug)
    x_{t+1} = x_t − η·m ;  θ ← x_{t+1}

Averaging Δ_i = x_{t−1} − x^i_{t−1} is averaging the weights, since x_{t−1} is the same on
every replica (g = x_{t−1} − x̄_{t−1} in the paper), and small differences compress better.
The first round has nothing to apply (x_1 = x_0); at the end of training ``flush`` applies
the last reduce, so no round's work is left out of the final weights. A reduce that did not complete changes
nothing: no update, momentum kept, every replica that skipped it stays consistent (that
round's local progress is lost, as a replica cannot apply a mean it does not know).

Staleness penalty λ, per tensor [unverified: the paper's exact formula is not confirmed]:
- ``fixed``: λ = ``penalty`` (1: no penalty). The update then works element by element:
  a member whose weights are sharded over its ranks can run it per region of the weights.
- ``gap_aware``: λ = max(1, ‖x_t − x_{t−1}‖ / mean_k ‖ḡ_k‖): how far the model moved
  since the stale gradient's model, in units of the typical update (Gap-Aware, Barkai et
  al. 2020, with norms per tensor instead of per element). Both terms are computed from
  data every replica shares; their statistics (per tensor) are part of the synchronized
  state, which under ``fixed`` is x_t and m only.

  The norms must come out the same on every replica, whatever the device and however a
  replica's tensors are cut: a member whose weights are sharded over its ranks holds a
  region of the flat weight vector per rank, pieces of the model's tensors (``WholeTensors``
  says where they lie and sums the pieces' squares over the ranks). So a norm is the square
  root of a float64 sum of squares (float32 squares are exact in float64; only the order of
  the sum differs between layouts, about 1e-15 relative at most), rounded to 16
  significant bits (``loco.optim.norms``): a layout changes a norm only when its sum falls within 1e-15 of a
  rounding boundary (about once in 10^10 norms). A replica whose weights then differ is out
  of the agreement and resynchronizes from a peer, as after any divergence.

Order at the end of round t, and why: wait first (the send buffer and the communicator's
result buffer are free only then), write Δ_t, apply ḡ_{t−1} (reads the result buffer),
then launch round t. One reduce is in flight at a time; see optim/background.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .background import BackgroundReducer
from .communicator import Communicator, ReduceResult
from .flat import as_layers, split_like
from .norms import rounded, squares64
from .outer import OuterStepResult

Staleness = Literal["fixed", "gap_aware"]


def _no_ranks(partials: list[float]) -> list[float]:
    return partials


@dataclass
class WholeTensors:
    """Where the model's tensors lie in the tensors a CO2 instance updates, for the gap-aware
    penalty's per-tensor norms. ``pieces[j]``: the stretches of local tensor j (flat
    offsets) that belong to whole tensors, as (whole tensor's index, start, end);
    ``sum_partials``: every whole tensor's sum of squares from this instance's share of it
    (a member's rank: summed over its ranks, on every rank; one process: as it is)."""

    count: int
    pieces: list[list[tuple[int, int, int]]]
    sum_partials: Callable[[list[float]], list[float]] = field(default=_no_ranks)

    @classmethod
    def own(cls, tensors: Sequence[torch.Tensor]) -> WholeTensors:
        """Every local tensor is a whole tensor of the model (one process)."""
        return cls(len(tensors), [[(j, 0, t.numel())] for j, t in enumerate(tensors)])

    def norms(self, tensors: Sequence[torch.Tensor]) -> list[float]:
        """The L2 norm of every whole tensor, from ``tensors`` (shaped like the local ones),
        rounded to 16 bits: the same on every replica (see the module's docstring)."""
        partials = [0.0] * self.count
        where, sums = [], []
        for j, t in enumerate(tensors):
            flat = t.reshape(-1)
            for i, start, end in self.pieces[j]:
                where.append(i)
                sums.append(squares64(flat[start:end]))
        if sums:  # (one host synchronization for all of them)
            for i, s in zip(where, torch.stack(sums).tolist(), strict=True):
                partials[i] += s
        return [rounded(math.sqrt(s)) for s in self.sum_partials(partials)]


class CO2:
    STATE_SECTIONS = ("anchor", "m")  # the state kept per weight, in synchronized_tensors' order
    STEPS_KEY = "outer_steps"  # the outer steps taken, in ``state_dict``

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        comm: Communicator,
        outer_lr: float = 0.5,
        momentum: float = 0.0,
        clip: float = 1.0,
        staleness: Staleness = "fixed",
        penalty: float = 1.0,
        background: bool = True,
    ):
        if staleness not in ("fixed", "gap_aware"):
            raise ValueError(f"staleness must be 'fixed' or 'gap_aware', got {staleness!r}")
        if penalty < 1:
            raise ValueError(f"penalty λ must be >= 1, got {penalty}")
        self.params = list(params)
        self.comm = comm
        self.outer_lr, self.momentum, self.clip = outer_lr, momentum, clip
        self.staleness, self.penalty = staleness, penalty
        self.anchor = [p.detach().to(torch.float32).clone() for p in self.params]  # x_t
        self.m = [torch.zeros_like(a) for a in self.anchor]
        self.whole = WholeTensors.own(self.anchor)  # (gap_aware) where the model's tensors lie in these
        # per whole tensor: [‖x_t − x_{t−1}‖, Σ_k ‖ḡ_k‖]; with outer_steps, all gap_aware needs
        self.stats = torch.zeros(self.whole.count, 2, dtype=torch.float64)
        self.background = background
        self.outer_steps = 0
        numel = sum(a.numel() for a in self.anchor)
        device = self.anchor[0].device if self.anchor else "cpu"
        self._send = torch.empty(numel, dtype=torch.float32, device=device)
        self._send_views = split_like(self._send, self.anchor)
        self._reducer = BackgroundReducer(comm) if background else None
        self._sync_result: ReduceResult | None = None
        # a replica that adopted a peer's state gets the reduce it missed from that peer
        self._adopted_pending: Callable[[], ReduceResult] | None = None
        self.pending_round = -1  # round whose reduce is in flight (-1: none)
        self.last_penalty: list[float] = []
        # called with the round of the reduce just taken and its result (None: none was in
        # flight; its tensors None: it failed) once it is applied, right before the next
        # reduce starts (which may reuse the communicator's result buffer that mean is in):
        # the caller tags that reduce with what its state now rests on, and serves the mean
        self.on_launch: Callable[[int, ReduceResult | None], None] | None = None

    def settings(self) -> dict[str, Any]:
        """The update rule's settings (another instance built with them applies the same
        rule: a member's ranks each over their own region of the weights)."""
        return {"outer_lr": self.outer_lr, "momentum": self.momentum, "clip": self.clip,
                "staleness": self.staleness, "penalty": self.penalty, "background": self.background}

    @property
    def element_wise(self) -> bool:
        """The update works element by element (a fixed penalty): no per-tensor statistics."""
        return self.staleness == "fixed"

    @property
    def replicated_sections(self) -> tuple[str, ...]:
        """The state after the per-weight sections (``synchronized_tensors``' order) that
        is about the whole model, not per weight: the same on every rank of a member whose
        ranks each hold a region of the weights (gap_aware: its statistics)."""
        return () if self.element_wise else ("stats",)

    def measure_whole_tensors(self, whole: WholeTensors) -> None:
        """Read the gap-aware penalty's norms over the whole tensors ``whole`` describes (this
        instance updates pieces of them: a region of a sharded member's weights). Before the
        first step."""
        if self.outer_steps or self.stats.any():
            raise RuntimeError("the whole tensors a CO2 instance measures are set before its first step")
        self.whole = whole
        self.stats = torch.zeros(whole.count, 2, dtype=torch.float64)

    # ------------------------------------------------------------------ step
    def _take_pending(self) -> ReduceResult | None:
        if self._adopted_pending is not None:
            fetch, self._adopted_pending = self._adopted_pending, None
            return fetch()
        if self._reducer is not None:
            return self._reducer.wait()
        result, self._sync_result = self._sync_result, None
        return result

    def outer_step(self, round: int) -> OuterStepResult:
        """End of round ``round``: apply round−1's mean, launch this round's reduce.
        ``extra["wait_s"]``: how long this call waited for that reduce (the part of it not
        hidden behind the round's computation)."""
        t0 = time.monotonic()
        stale = self._take_pending()
        wait_s = time.monotonic() - t0
        with torch.no_grad():
            for d, a, p in zip(self._send_views, self.anchor, self.params, strict=True):
                torch.sub(a, p.detach().to(torch.float32), out=d)
        norm = float(self._send.norm())
        applied = stale is not None and stale.tensors is not None
        if applied:
            self.apply(as_layers(stale.tensors, self.anchor))
        if self.on_launch is not None:
            self.on_launch(round - 1, stale)
        if self._reducer is not None:
            self._reducer.start(self._send_views, round)
        else:  # sequential mode (tests, and the reference the threaded mode must equal)
            self._sync_result = self.comm.all_reduce_mean(self._send_views, round)
        self.pending_round = round
        self.reset_params()
        group = stale.group_size if stale is not None else 0
        return OuterStepResult(applied, group, norm, stale,
                               extra={"stale_round": round - 1, "penalty": list(self.last_penalty),
                                      "wait_s": wait_s})

    def flush(self) -> OuterStepResult | None:
        """End of training: wait for the reduce in flight and apply it, launching nothing,
        so the last round's progress is in the final weights. None if nothing was in flight."""
        if self.pending_round < 0:
            return None
        stale = self._take_pending()
        applied = stale is not None and stale.tensors is not None
        if applied:
            self.apply(as_layers(stale.tensors, self.anchor))
        self.reset_params()
        round, self.pending_round = self.pending_round, -1
        return OuterStepResult(applied, stale.group_size if stale is not None else 0, 0.0, stale,
                               extra={"stale_round": round, "penalty": list(self.last_penalty)})

    @torch.no_grad()
    def apply(self, g: Sequence[torch.Tensor]) -> None:
        """m ← clamp(β·m + g/λ, −c, c); x ← x − η·m (in place; λ per whole tensor)."""
        penalties = self._penalties(g)
        for j, (a, m, gj) in enumerate(zip(self.anchor, self.m, g, strict=True)):
            gj = gj.to(a.device)
            if self.element_wise:
                m.mul_(self.momentum).add_(gj, alpha=1.0 / self.penalty)
            else:  # each whole tensor's piece of it with that tensor's λ
                m_flat, g_flat = m.view(-1), gj.reshape(-1)
                for i, start, end in self.whole.pieces[j]:
                    m_flat[start:end].mul_(self.momentum).add_(g_flat[start:end], alpha=1.0 / penalties[i])
            if self.clip:
                m.clamp_(-self.clip, self.clip)
            a.add_(m, alpha=-self.outer_lr)
        if not self.element_wise:  # ‖x_{t+1} − x_t‖ per tensor: next round's gap
            self.stats[:, 0] = self.outer_lr * torch.tensor(self.whole.norms(self.m), dtype=torch.float64)
        self.last_penalty = penalties
        self.outer_steps += 1

    def _penalties(self, g: Sequence[torch.Tensor]) -> list[float]:
        if self.element_wise:
            return [self.penalty] * len(g)
        self.stats[:, 1] += torch.tensor(self.whole.norms(g), dtype=torch.float64)
        mean_g = self.stats[:, 1] / (self.outer_steps + 1)
        out = []
        for i in range(self.whole.count):
            gap, typical = float(self.stats[i, 0]), float(mean_g[i])
            out.append(max(1.0, gap / typical) if typical > 0 else 1.0)
        return out

    @torch.no_grad()
    def reset_params(self) -> None:
        for p, a in zip(self.params, self.anchor, strict=True):
            p.copy_(a)

    def close(self) -> None:
        """Wait for the reduce in flight (if any) and stop the background thread."""
        if self._reducer is not None:
            self._reducer.close()

    # ------------------------------------------------------------ state
    def synchronized_tensors(self) -> list[torch.Tensor]:
        """Identical on every replica: x_t, m and (``gap_aware``) the gap statistics."""
        return [*self.anchor, *self.m, *self._stats()]

    def _stats(self) -> list[torch.Tensor]:
        return [] if self.element_wise else [self.stats]

    def load_synchronized(self, tensors: Sequence[torch.Tensor], outer_steps: int, reset_params: bool = True,
                          pending: Callable[[], ReduceResult] | None = None) -> None:
        """Adopt a peer's state. ``pending`` fetches the mean of the reduce that was in flight
        when the peer published it (the adopter missed it); without it, the next step
        applies nothing."""
        mine = self.synchronized_tensors()
        if len(tensors) != len(mine):
            what = "anchor, momentum" + ("" if self.element_wise else ", stats")
            raise ValueError(f"expected {len(mine)} tensors ({what}), got {len(tensors)}")
        for dst, src in zip(mine, tensors, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"shape mismatch: local {tuple(dst.shape)}, received {tuple(src.shape)}")
            dst.copy_(src)
        self.outer_steps = outer_steps
        if self._reducer is not None and self._reducer.in_flight is not None:
            self._reducer.wait()  # this replica's own reduce is void now
        self._sync_result = None
        self._adopted_pending = pending
        if reset_params:
            self.reset_params()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self.anchor], "m": [m.clone() for m in self.m],
                **({} if self.element_wise else {"stats": self.stats.clone()}), "outer_steps": self.outer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint. The reduce that was in flight is lost: the first step
        after a restart applies nothing (a peer's state, fetched on catch-up, replaces this)."""
        if not self.element_wise and "stats" not in state:
            raise ValueError("this CO2 state holds no gap statistics: it was saved with staleness 'fixed', "
                             "this is 'gap_aware'")
        stats = [] if self.element_wise else [state["stats"]]  # (a fixed penalty reads none)
        self.load_synchronized([*state["anchor"], *state["m"], *stats], int(state["outer_steps"]),
                               reset_params=False)

