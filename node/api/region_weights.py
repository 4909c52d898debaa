"""The weights of a rank's region of a sharded member's flat weight vector, read from and
written to its FSDP shards (the region whose outer state the rank keeps: split_state.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from loco.protocols.regions import split_bounds

from .ranks import ShardedWeights
from .split_state import SplitOuterState

if TYPE_CHECKING:
    from .ranks import Ranks


class RegionWeights(ShardedWeights):
    """The weights of this rank's region of the member's flat vector (the parameters end to
    end, in order), in a float32 host buffer (``outer_params``), read from and written to the
    FSDP shards. Both are collectives over the member's ranks, one parameter at a time: a
    parameter is whole on every rank's device only while it passes."""

    def __init__(self, params: list[torch.Tensor], ranks: Ranks):
        self.check(params, ranks)
        self.params = params
        self.ranks = ranks
        self.full = []  # no rank holds the whole weights
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.bounds = split_bounds(self.offsets[-1], ranks.size)
        self.lo, self.hi = self.bounds[ranks.rank], self.bounds[ranks.rank + 1]
        # per parameter, per rank: the stretch of it (flat offsets) that rank's region holds
        self.pieces = [[(max(start, a), max(max(start, a), min(end, b)))
                        for a, b in zip(self.bounds, self.bounds[1:], strict=False)]
                       for start, end in zip(self.offsets, self.offsets[1:], strict=False)]
        self.buffer = torch.empty(self.hi - self.lo, dtype=torch.float32)
        self._finite = True
        self.split: SplitOuterState | None = None  # the leader's, once its outer math is built

    @property
    def outer_params(self) -> list[torch.Tensor]:
        return [self.buffer]

    @torch.no_grad()
    def gather(self) -> None:
        for i, p in enumerate(self.params):
            whole = p.full_tensor()  # (every rank takes part for every parameter)
            a, b = self.pieces[i][self.ranks.rank]
            if a < b:
                start = self.offsets[i]
                self.buffer[a - self.lo:b - self.lo].copy_(whole.reshape(-1)[a - start:b - start])
            del whole
        # whether the whole member's weights are finite (a rank's own region says only its part)
        self._finite = all(self.ranks.all_gather(bool(torch.isfinite(self.buffer).all())))

    @torch.no_grad()
    def scatter(self) -> None:
        from torch.distributed.tensor import distribute_tensor

        for i, p in enumerate(self.params):
            pieces = self.pieces[i]
            width = max(b - a for a, b in pieces)
            if width == 0:
                continue
            local = p.to_local()
            # every rank's piece in the parameter's dtype, as raw bytes: the same rounding as a
            # one-process member's θ ← φ, and any dtype over any backend
            mine = torch.zeros(width, dtype=p.dtype, device=self.ranks.device)
            a, b = pieces[self.ranks.rank]
            mine[:b - a].copy_(self.buffer[a - self.lo:b - self.lo])
            raw = [torch.empty_like(mine.view(torch.uint8)) for _ in range(self.ranks.size)]
            dist.all_gather(raw, mine.view(torch.uint8), group=self.ranks.group)
            whole = torch.cat([r.view(p.dtype)[:b - a] for r, (a, b) in zip(raw, pieces, strict=True)])
            whole = whole.view(p.shape).to(local.device)
            # every rank holds the whole parameter: it takes its own shard, without communication
            local.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local())
            del whole, raw

    def member_finite(self) -> bool:
        return self._finite

    def before_news(self) -> None:
        if self.split is not None:
            self.split.deliver()

    def outer_math(self, math: Any, serves_results: bool = False) -> SplitOuterState:
        self.split = SplitOuterState(self, math, serves_results)
        return self.split
