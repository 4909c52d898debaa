"""Error feedback's remainders, per stream, kept only over the stretch of the vector this
process encodes.

A rank of a member of several processes encodes only its own region of a round's vector
(its parts, the segments it averages, its region of a gossip), so a remainder of the whole
vector's length would be mostly zeros: per rank, two more copies of the model (committed and
staged) for every stream. Each stream's buffers cover the smallest stretch holding every
slice encoded so far, and grow when a slice falls outside it (keeping what they hold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Span:
    total: int  # the length of the vector the stream encodes slices of
    base: int  # the position committed[0] stands for
    committed: torch.Tensor  # remainders of values a peer used
    work: torch.Tensor  # remainders staged since the last commit

    @property
    def end(self) -> int:
        return self.base + self.committed.numel()


class Residuals:
    def __init__(self) -> None:
        self._spans: dict[str, _Span] = {}

    def slices(self, stream: str, total: int, lo: int, hi: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(committed, staged) remainders of positions ``[lo, hi)`` of the ``total``-long
        vector ``stream`` encodes, on ``device``. A new vector length carries nothing over."""
        span = self._spans.get(stream)
        if span is None or span.total != total:
            span = self._spans[stream] = _Span(total, lo, *(torch.zeros(hi - lo, dtype=torch.float32, device=device)
                                                            for _ in range(2)))
        elif lo < span.base or hi > span.end:  # a slice outside the stretch held so far
            base, end = min(span.base, lo), max(span.end, hi)
            grown = [torch.zeros(end - base, dtype=torch.float32, device=device) for _ in range(2)]
            for new, old in zip(grown, (span.committed, span.work), strict=True):
                new[span.base - base:span.end - base].copy_(old)
            span = self._spans[stream] = _Span(total, base, *grown)
        elif span.committed.device != device:  # the caller moved (e.g. a checkpoint loaded on the CPU)
            span.committed, span.work = span.committed.to(device), span.work.to(device)
        a, b = lo - span.base, hi - span.base
        return span.committed[a:b], span.work[a:b]

    def commit(self, stream: str, lo: int, hi: int) -> None:
        """Positions ``[lo, hi)``'s staged remainders become the committed ones."""
        span = self._spans[stream]
        span.committed[lo - span.base:hi - span.base] = span.work[lo - span.base:hi - span.base]

    @property
    def held_bytes(self) -> int:
        return sum(2 * 4 * s.committed.numel() for s in self._spans.values())

    def state_dict(self) -> dict[str, Any]:
        return {"residual": {k: s.committed.clone() for k, s in self._spans.items()},
                "residual_at": {k: [s.base, s.total] for k, s in self._spans.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A state saved by ``state_dict``, or one of a whole vector's remainders per stream
        (saved before the stretches: at position 0, as long as the vector)."""
        at = state.get("residual_at", {})
        self._spans = {}
        for k, v in state.get("residual", {}).items():
            base, total = (int(x) for x in at.get(k, (0, v.numel())))
            if base < 0 or base + v.numel() > total:
                raise ValueError(f"the error-feedback remainders of stream {k!r} ({v.numel()} values from "
                                 f"position {base}) do not fit its {total}-long vector")
            self._spans[k] = _Span(total, base, v.clone(), torch.zeros_like(v))
