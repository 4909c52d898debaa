"""Streaming DiLoCo (Douillard et al. 2025), docs/ALGORITHMS.md section 2: DiLoCo fragment by
fragment, on staggered schedules, with the communication overlapped by τ inner steps.

The parameters are split into P fragments (``strided_fragments``: blocks p, p+P, p+2P, ...
form fragment p). With s = inner steps done since the start of training, fragment p::

    at s ≥ 1 with (s − t_p) mod H == 0,  t_p = p·H // P   send:  Δ_p = φ_p − θ_p
    at s + τ                                              apply: θ̃_p = OuterSGD(φ_p, Δ̄_p)
                                                                 φ_p ← θ̃_p
                                                                 θ_p ← α·θ_p + (1 − α)·θ̃_p

so each fragment is averaged once every H steps and only ~1/P of the model is on the wire
at a time (peak bandwidth 1/P of DiLoCo's). With τ = 0 nothing trained while the fragment
was away, so θ_p ← θ̃_p (α does not apply): with P = 1 this is exactly DiLoCo (tested).
The config requires τ < H // P, so at most one fragment is in flight; the outer optimizer
is DiLoCo's Nesterov SGD, with its momentum per parameter. Round ids given to the
communicator are the send steps s: unique and increasing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .background import BackgroundReducer, PendingReduce
from .communicator import Communicator, ReduceResult
from .flat import as_layers, split_like
from .outer import nesterov_sgd_step

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def strided_fragments(names: Sequence[str], numels: Sequence[int], fragments: int) -> list[list[int]]:
    """Parameter indices per fragment. A parameter whose name has a block index (the first
    integer component, e.g. ``blocks.3.attn.weight``) goes to fragment index % P; the
    others (embeddings, final norm, head) go, largest first, to the fragment with the
    fewest parameters so far, to keep peak bytes near 1/P. Every node computes the same
    split from the same model."""
    out: list[list[int]] = [[] for _ in range(fragments)]
    sizes = [0] * fragments
    rest = []
    for i, name in enumerate(names):
        m = _BLOCK_INDEX.search(name)
        if m is None:
            rest.append(i)
            continue
        p = int(m.group(1)) % fragments
        out[p].append(i)
        sizes[p] += numels[i]
    for i in sorted(rest, key=lambda i: -numels[i]):
        p = min(range(fragments), key=lambda q: sizes[q])
        out[p].append(i)
        sizes[p] += numels[i]
    return [sorted(f) for f in out]


def schedule(step: int, inner_steps: int, fragments: int) -> int | None:
    """The fragment that sends after ``step`` inner steps, or None."""
    if step < 1:
        return None
    for p in range(fragments):
        if (step - p * inner_steps // fragments) % inner_steps == 0:
            return p
    return None


@dataclass
class FragmentEvent:
    """One fragment sync as the caller records it."""

    fragment: int
    send_step: int
    applied: bool
    group_size: int
    numel: int
    reduce: ReduceResult | None
    blocked_s: float = 0.0
    sync_bytes: int = 0  # filled in by the caller, which can see the socket


class StreamingDiLoCo:
    STATE_SECTIONS = ("anchor", "buf")  # the state kept per weight, in synchronized_tensors' order
    STEPS_KEY = "fragment_steps"  # the outer steps taken, in ``state_dict``

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        comm: Communicator,
        fragments: list[list[int]],
        inner_steps: int,
        outer_lr: float = 0.7,
        momentum: float = 0.9,
        nesterov: bool = True,
        overlap: int = 0,
        mix: float = 0.5,
    ):
        self.params = list(params)
        covered = sorted(i for f in fragments for i in f)
        if covered != list(range(len(self.params))):
            raise ValueError("fragments must cover every parameter exactly once")
        if overlap >= max(1, inner_steps // len(fragments)):
            raise ValueError(f"overlap {overlap} must be below inner_steps // fragments")
        self.comm = comm
        self.fragments = fragments
        self.H, self.overlap, self.mix = inner_steps, overlap, mix
        self.outer_lr, self.momentum, self.nesterov = outer_lr, momentum, nesterov
        self.anchor = [p.detach().to(torch.float32).clone() for p in self.params]
        self.buf = [torch.zeros_like(a) for a in self.anchor]
        # the parameters fragment by fragment: the order of the synchronized state, in which
        # every fragment is one stretch (a member whose ranks each keep their region of every
        # fragment serves and hashes it in this order, as a one-process member does)
        self.order = [i for f in fragments for i in f]
        self.fragment_steps = [0] * len(fragments)  # outer steps applied, per fragment
        self.spans = [1] * len(fragments)  # sync periods each fragment's next Δ covers
        device = self.anchor[0].device if self.anchor else "cpu"
        self._send = []  # one flat Δ buffer per fragment, reused every sync
        for f in fragments:
            numel = sum(self.anchor[i].numel() for i in f)
            self._send.append(torch.empty(numel, dtype=torch.float32, device=device))
        self._reducer = BackgroundReducer(comm) if overlap > 0 else None
        self._in_flight: tuple[int, int, PendingReduce | _Done] | None = None  # (fragment, send step, handle)

    def settings(self) -> dict[str, Any]:
        """The update rule's settings, fragments and schedule included (another instance built
        with them applies the same rule: a member's ranks each over their own region of
        every fragment, one tensor per fragment)."""
        return {"fragments": [list(f) for f in self.fragments], "inner_steps": self.H, "outer_lr": self.outer_lr,
                "momentum": self.momentum, "nesterov": self.nesterov, "overlap": self.overlap, "mix": self.mix}

    @property
    def outer_steps(self) -> int:
        return sum(self.fragment_steps)

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    @property
    def in_flight_step(self) -> int | None:
        """The send step of the fragment in flight, if any."""
        return None if self._in_flight is None else self._in_flight[1]

    def touched_fragments(self, step: int) -> list[int]:
        """The fragments whose weights ``after_inner_step(step)`` will read or write (the one
        that lands, the one that leaves): a caller whose weights are sharded gathers those
        first."""
        touched = [self._in_flight[0]] if self._in_flight is not None and \
            step >= self._in_flight[1] + self.overlap else []
        leaves = schedule(step, self.H, len(self.fragments))
        return touched + ([leaves] if leaves is not None and leaves not in touched else [])

    def after_inner_step(self, step: int) -> list[FragmentEvent]:
        """Call after every inner step with s = steps done; returns the syncs that finished."""
        events = []
        if self._in_flight is not None and step >= self._in_flight[1] + self.overlap:
            events.append(self._finish())
        p = schedule(step, self.H, len(self.fragments))
        if p is not None:
            self._start(p, step)
            if self.overlap == 0:
                events.append(self._finish())
        return events

    def _views(self, p: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        idx = self.fragments[p]
        return ([self.anchor[i] for i in idx], [self.buf[i] for i in idx], [self.params[i] for i in idx],
                split_like(self._send[p], [self.anchor[i] for i in idx]))

    @torch.no_grad()
    def _start(self, p: int, step: int) -> None:
        anchor, _, params, delta = self._views(p)
        for d, a, q in zip(delta, anchor, params, strict=True):
            torch.sub(a, q.detach().to(torch.float32), out=d)
        if self._reducer is not None:
            handle = self._reducer.start(delta, step, span=self.spans[p])
        else:
            handle = _Done(self.comm.all_reduce_mean(delta, step, span=self.spans[p]), step)
        self._in_flight = (p, step, handle)

    @torch.no_grad()
    def _finish(self) -> FragmentEvent:
        assert self._in_flight is not None
        p, step, handle = self._in_flight
        self._in_flight = None
        t0 = time.monotonic()
        result = self._reducer.wait() if self._reducer is not None else handle.wait()
        blocked = time.monotonic() - t0
        event = FragmentEvent(p, step, False, result.group_size, self._send[p].numel(), result, blocked)
        if result.tensors is None:
            self.spans[p] += 1
            return event  # nothing changes; the next Δ_p spans both periods
        anchor, buf, params, _ = self._views(p)
        mean = as_layers(result.tensors, anchor)
        nesterov_sgd_step(anchor, buf, mean, self.outer_lr, self.momentum, self.nesterov,
                          first=self.fragment_steps[p] == 0)
        self.fragment_steps[p] += 1
        self.spans[p] = 1
        for q, a in zip(params, anchor, strict=True):
            if self.overlap > 0 and self.mix > 0:
                q.mul_(self.mix).add_(a.to(q.dtype), alpha=1 - self.mix)
            else:
                q.copy_(a)
        event.applied = True
        return event

    def drain(self) -> list[FragmentEvent]:
        """Finish the fragment in flight (before a checkpoint or shutdown)."""
        return [self._finish()] if self._in_flight is not None else []

    def close(self) -> None:
        self.drain()
        if self._reducer is not None:
            self._reducer.close()

    @torch.no_grad()
    def reset_params(self) -> None:
        for p, a in zip(self.params, self.anchor, strict=True):
            p.copy_(a)

    # ------------------------------------------------------------ state
    def synchronized_tensors(self) -> list[torch.Tensor]:
        """φ then the momentum, each fragment by fragment (``order``)."""
        return [*(self.anchor[i] for i in self.order), *(self.buf[i] for i in self.order)]

    def load_synchronized(self, tensors: Sequence[torch.Tensor], fragment_steps: Sequence[int] | int,
                          reset_params: bool = True) -> None:
        """Adopt a peer's φ and momentum, in ``synchronized_tensors``' order."""
        n = len(self.anchor)
        if len(tensors) != 2 * n:
            raise ValueError(f"expected {2 * n} tensors (anchor + momentum), got {len(tensors)}")
        mine = self.synchronized_tensors()
        for dst, src in zip(mine, tensors, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"shape mismatch: local {tuple(dst.shape)}, received {tuple(src.shape)}")
        if isinstance(fragment_steps, int):  # a total: spread as the schedule would have
            P = len(self.fragments)
            fragment_steps = [fragment_steps // P + (1 if p < fragment_steps % P else 0) for p in range(P)]
        if len(fragment_steps) != len(self.fragments):
            raise ValueError(f"expected {len(self.fragments)} fragment step counts, got {len(fragment_steps)}")
        if self._in_flight is not None:  # our own sync is void: the peer's state replaces it
            self._in_flight = None
            if self._reducer is not None:
                self._reducer.wait()
        for dst, src in zip(mine, tensors, strict=True):
            dst.copy_(src)
        self.fragment_steps = [int(x) for x in fragment_steps]
        self.spans = [1] * len(self.fragments)
        if reset_params:
            self.reset_params()

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.clone() for a in self.anchor], "buf": [b.clone() for b in self.buf],
                "fragment_steps": list(self.fragment_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint (``state_dict``: parameter order)."""
        anchor, buf = state["anchor"], state["buf"]
        if len(anchor) != len(self.anchor) or len(buf) != len(self.buf):
            raise ValueError(f"expected {len(self.anchor)} anchor and momentum tensors, got {len(anchor)} and {len(buf)}")
        self.load_synchronized([*(anchor[i] for i in self.order), *(buf[i] for i in self.order)],
                               state["fragment_steps"], reset_params=False)


class _Done:
    """A reduce that already finished (τ = 0 runs it on the caller's thread)."""

    def __init__(self, result: ReduceResult, round: int):
        self.result, self.round = result, round

    def wait(self) -> ReduceResult:
        return self.result
