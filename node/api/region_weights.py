"""The weights of a rank's region of a sharded member's flat weight vector (or of each group
of its parameters: Streaming DiLoCo's fragments), read from and written to its FSDP shards
(the region whose outer state the rank keeps: split_state.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from loco.protocols.codecs import Layout
from loco.protocols.regions import split_bounds

from .ranks import ShardedWeights
from .split_state import SplitOuterState

if TYPE_CHECKING:
    from .ranks import Ranks


@dataclass
class WeightGroup:
    """Parameters whose flat vector (theirs end to end, in order) is cut into one region per
    rank: the member's whole weights (DiLoCo, CO2), or one Streaming DiLoCo fragment."""

    params: list[int]  # indices into the member's parameters, in order
    shapes: list[tuple[int, ...]]
    bounds: list[int]  # every rank's region of the group's flat vector (split_bounds)
    lo: int  # this rank's region of it
    hi: int
    view: torch.Tensor  # this rank's region, in its host buffer


class RegionWeights(ShardedWeights):
    """The weights of this rank's region of every group of the member's parameters (one
    group of them all by default; see ``WeightGroup``), in one float32 host buffer (a view
    of it per group: ``outer_params``), read from and written to the FSDP shards. Both are
    collectives over the member's ranks, one parameter at a time: a parameter is whole on
    every rank's device only while it passes."""

    def __init__(self, params: list[torch.Tensor], ranks: Ranks, groups: list[list[int]] | None = None):
        self.check(params, ranks)
        self.params = params
        self.ranks = ranks
        self.full = []  # no rank holds the whole weights
        groups = groups if groups is not None else [list(range(len(params)))]
        if sorted(i for g in groups for i in g) != list(range(len(params))):
            raise ValueError("the groups of parameters must hold every parameter once")
        bounds = [split_bounds(sum(params[i].numel() for i in g), ranks.size) for g in groups]
        r = ranks.rank
        buffer = torch.empty(sum(b[r + 1] - b[r] for b in bounds), dtype=torch.float32)
        self.groups: list[WeightGroup] = []
        self.pieces: dict[int, tuple[int, int, list[tuple[int, int]]]] = {}  # param: (group, its offset, per rank)
        offset = 0
        for g, (members, bnd) in enumerate(zip(groups, bounds, strict=True)):
            width = bnd[r + 1] - bnd[r]
            self.groups.append(WeightGroup(list(members), [tuple(params[i].shape) for i in members], bnd,
                                           bnd[r], bnd[r + 1], buffer[offset:offset + width]))
            offset += width
            start = 0
            for i in members:  # the stretch of it (offsets in the group's vector) each rank's region holds
                end = start + params[i].numel()
                self.pieces[i] = (g, start, [(max(start, a), max(max(start, a), min(end, b)))
                                             for a, b in zip(bnd, bnd[1:], strict=False)])
                start = end
        self.buffer = buffer
        self.order = [i for g in self.groups for i in g.params]  # the parameters group by group
        self.shapes = [tuple(params[i].shape) for i in self.order]
        self.numel = sum(p.numel() for p in params)
        self._finite = True
        self.split: SplitOuterState | None = None  # the leader's, once its outer math is built

    @property
    def outer_params(self) -> list[torch.Tensor]:
        return [g.view for g in self.groups]

    @torch.no_grad()
    def gather(self, only: list[int] | None = None) -> None:
        self.read(self.params, self.outer_params, only)
        # whether the whole member's weights are finite (a rank's own region says only its part)
        self._finite = all(self.ranks.all_gather(bool(torch.isfinite(self.buffer).all())))

    @torch.no_grad()
    def scatter(self, only: list[int] | None = None) -> None:
        self.write(self.params, self.outer_params, only)

    @torch.no_grad()
    def read(self, tensors: list[torch.Tensor | None], regions: list[torch.Tensor],
             only: list[int] | None = None) -> None:
        """This rank's region of ``tensors`` (sharded like the parameters, one per parameter:
        the weights, their gradients, an optimizer's moments; None reads as zeros, and must be
        None on every rank) into ``regions`` (one flat tensor per group, like
        ``outer_params``). A collective: one tensor at a time is whole on the device."""
        for i in self._indices(only):
            g, start, pieces = self.pieces[i]
            a, b = pieces[self.ranks.rank]
            lo = self.groups[g].lo
            if tensors[i] is None:
                regions[g][a - lo:b - lo].zero_()
                continue
            whole = tensors[i].full_tensor()  # (every rank takes part for every tensor)
            if a < b:
                regions[g][a - lo:b - lo].copy_(whole.reshape(-1)[a - start:b - start])
            del whole

    @torch.no_grad()
    def write(self, tensors: list[torch.Tensor], regions: list[torch.Tensor], only: list[int] | None = None) -> None:
        """Every rank's ``regions`` into its shards of ``tensors`` (the inverse of ``read``)."""
        from torch.distributed.tensor import distribute_tensor

        for i in self._indices(only):
            t = tensors[i]
            g, _, pieces = self.pieces[i]
            lo = self.groups[g].lo
            width = max(b - a for a, b in pieces)
            if width == 0:
                continue
            local = t.to_local()
            # every rank's piece in the tensor's dtype, as raw bytes: the same rounding as a
            # one-process member's θ ← φ, and any dtype over any backend
            mine = torch.zeros(width, dtype=t.dtype, device=self.ranks.device)
            a, b = pieces[self.ranks.rank]
            mine[:b - a].copy_(regions[g][a - lo:b - lo])
            raw = [torch.empty_like(mine.view(torch.uint8)) for _ in range(self.ranks.size)]
            dist.all_gather(raw, mine.view(torch.uint8), group=self.ranks.group)
            whole = torch.cat([r.view(t.dtype)[:b - a] for r, (a, b) in zip(raw, pieces, strict=True)])
            whole = whole.view(t.shape).to(local.device)
            # every rank holds the whole tensor: it takes its own shard, without communication
            local.copy_(distribute_tensor(whole, t.device_mesh, t.placements, src_data_rank=None).to_local())
            del whole, raw

    def group_layout(self, g: int) -> Layout:
        """The shapes of group ``g``'s parameters (what the member exchanges of it)."""
        return Layout([torch.Size(s) for s in self.groups[g].shapes])

    def member_finite(self) -> bool:
        return self._finite

    def before_news(self) -> None:
        if self.split is not None:
            self.split.deliver()

    def outer_math(self, math: Any, serves_results: bool = False) -> SplitOuterState:
        self.split = SplitOuterState(self, math, serves_results)
        return self.split
