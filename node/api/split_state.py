"""A sharded member's outer state split over its ranks: no rank holds the whole of it.

With FSDP inside a member (parameters sharded over its ranks) and DiLoCo across members,
every rank ``r`` keeps the outer state of its own region ``[bounds[r], bounds[r + 1])`` of
the flat weight vector (``loco.protocols.regions.split_bounds``: the same regions its
endpoint exchanges): the weights θ of the region, the anchor φ, the outer momentum and the
pseudo-gradient Δ, in host memory. A round's end is then local on every rank: θ comes from
the FSDP shards one parameter at a time (``RegionWeights.gather``), the rank computes its
Δ, exchanges it with the matching regions of the other members from its own endpoint
(rank_exchange.py), applies the outer step to its φ and momentum, and writes θ ← φ back into
the shards one parameter at a time (``RegionWeights.scatter``). Per rank that is 4/k of the
model in float32 instead of a whole copy of every buffer on rank 0.

The leader (rank 0) still speaks for the member: it runs matchmaking and the commit step
and tells the other ranks, in order, what to do (``SplitOuterState``): run the outer step of
a sync, load a whole state it adopted (a peer's, a checkpoint's, its last snapshot after the
weights went non-finite) of which each keeps its region, or hand in their regions so it can
publish the state. What it publishes (the state peers fetch and the weights hash they
compare) is the whole state, gathered once per round into host memory: a member of any rank
count serves and hashes exactly what a one-process member does.

The other ranks (``SplitFollower``) run the same outer math over their own region, with the
exchange their lane ran as their communicator (``RegionCommunicator``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from loco.optim import ReduceResult
from loco.protocols.flat import flat_of, unflatten
from loco.protocols.regions import split_bounds

from .ranks import ShardedWeights

if TYPE_CHECKING:
    from .rank_exchange import RankLane
    from .ranks import Ranks

# what the leader tells the other ranks on the member's control channel, besides a step's news
OUTER, LOAD, GATHER = "split-outer", "split-load", "split-gather"


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

    def outer_math(self, math: Any) -> SplitOuterState:
        self.split = SplitOuterState(self, math)
        return self.split


def _views(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    out, offset = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[offset:offset + n].view(s))
        offset += n
    return out


class SplitOuterState:
    """On the leader: its own region's outer math (``math``, built over
    ``RegionWeights.outer_params``), presented to the algorithm as the whole member's (the
    same calls as ``loco.optim.DiLoCo``'s). The other ranks are told each step in order; the
    whole state is gathered once after every state change that is published, and kept for
    what reads it until the next change (the weights hash, a checkpoint, peers' fetches)."""

    hands_over_state = True
    """The whole state it returns is never modified afterwards (a change replaces it): it is
    published without a copy, so rank 0 keeps one whole copy of φ and the momentum, not two."""

    def __init__(self, region: RegionWeights, math: Any):
        self.region = region
        self.ranks = region.ranks
        self.math = math
        self.shapes = [p.shape for p in region.params]
        self._whole: list[torch.Tensor] | None = None  # φ's layers then the momentum's, gathered or loaded
        self._pending: tuple[torch.Tensor, torch.Tensor, int, bool] | None = None  # a load not yet told
        # the other ranks build the same math over their regions
        self.ranks.share((type(math), math.settings()))
        self._whole = self._gather()  # (the other ranks are in their constructor: listening)

    @property
    def outer_steps(self) -> int:
        return self.math.outer_steps

    @property
    def anchor(self) -> list[torch.Tensor]:
        return self.synchronized_tensors()[:len(self.shapes)]

    def held_tensors(self) -> list[torch.Tensor]:
        """The outer state this rank keeps for its own region."""
        return [*self.math.anchor, *self.math.buf]

    def synchronized_tensors(self) -> list[torch.Tensor]:
        """The whole member's φ and momentum, layer by layer (float32, host memory)."""
        if self._whole is None:
            self._whole = self._gather()
        return self._whole

    def _gather(self) -> list[torch.Tensor]:
        self.ranks.share((GATHER,))
        total = self.region.bounds[-1]
        anchor, buf = torch.empty(total), torch.empty(total)
        self.ranks.gather_regions(self.math.anchor[0], self.region.bounds, anchor)
        self.ranks.gather_regions(self.math.buf[0], self.region.bounds, buf)
        return [*_views(anchor, self.shapes), *_views(buf, self.shapes)]

    def load_synchronized(self, tensors: Sequence[torch.Tensor], outer_steps: int, reset_params: bool = True) -> None:
        """Adopt a whole state (a peer's, a checkpoint's): this rank's region now, the other
        ranks' when they next listen (``deliver``: before the next outer step or news)."""
        n = len(self.shapes)
        if len(tensors) != 2 * n:
            raise ValueError(f"expected {2 * n} tensors (anchor + momentum), got {len(tensors)}")
        for t, shape in zip(tensors, [*self.shapes, *self.shapes], strict=True):
            if t.shape != shape:
                raise ValueError(f"shape mismatch: local {tuple(shape)}, received {tuple(t.shape)}")
        anchor, buf = flat_of(tensors[:n]).clone(), flat_of(tensors[n:]).clone()
        lo, hi = self.region.lo, self.region.hi
        self.math.load_synchronized([anchor[lo:hi], buf[lo:hi]], outer_steps, reset_params=reset_params)
        self._whole = [*_views(anchor, self.shapes), *_views(buf, self.shapes)]
        self._pending = (anchor, buf, outer_steps, reset_params)

    def deliver(self) -> None:
        """The other ranks take their regions of a state loaded since they last listened."""
        if self._pending is None:
            return
        anchor, buf, outer_steps, reset_params = self._pending
        self._pending = None
        self.ranks.share((LOAD, outer_steps, reset_params))
        self.ranks.scatter_regions(anchor, self.region.bounds)
        self.ranks.scatter_regions(buf, self.region.bounds)

    def outer_step(self, round: int) -> Any:
        self.deliver()
        self.ranks.share((OUTER, round))
        result = self.math.outer_step(round)
        if result.applied:
            self._whole = None
        return result

    def state_dict(self) -> dict[str, Any]:
        whole = self.synchronized_tensors()
        n = len(self.shapes)
        return {"anchor": list(whole[:n]), "buf": list(whole[n:]), "outer_steps": self.outer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_synchronized([*state["anchor"], *state["buf"]], int(state["outer_steps"]), reset_params=False)


class RegionCommunicator:
    """A follower rank's communicator: the mean of its region as its lane averaged it in the
    round the leader committed (None where the round was not)."""

    def __init__(self, lane: RankLane):
        self.lane = lane

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        out = self.lane.reduce(round, flat_of(tensors))
        if out is None:
            return ReduceResult(None, 1)
        return ReduceResult(unflatten(out, tensors), 0)  # (the group's size is the leader's to report)


class SplitFollower:
    """A follower rank's side of ``SplitOuterState``: the same outer math over its own
    region, run as the leader says."""

    def __init__(self, region: RegionWeights, lane: RankLane):
        self.region = region
        self.ranks = region.ranks
        math_type, settings = self.ranks.share()
        self.math = math_type(region.outer_params, RegionCommunicator(lane), **settings)
        self.serve(self.ranks.share())  # the leader's first gather

    def held_tensors(self) -> list[torch.Tensor]:
        """The outer state this rank keeps for its own region."""
        return [*self.math.anchor, *self.math.buf]

    def serve(self, command: tuple) -> None:
        kind, bounds = command[0], self.region.bounds
        if kind == OUTER:
            self.math.outer_step(command[1])
        elif kind == GATHER:
            self.ranks.gather_regions(self.math.anchor[0], bounds, None)
            self.ranks.gather_regions(self.math.buf[0], bounds, None)
        elif kind == LOAD:
            _, outer_steps, reset_params = command
            anchor = self.ranks.scatter_regions(None, bounds)
            buf = self.ranks.scatter_regions(None, bounds)
            self.math.load_synchronized([anchor, buf], outer_steps, reset_params=reset_params)
        else:
            raise RuntimeError(f"rank {self.ranks.rank}: the leader asked {kind!r}, which a split outer state "
                               "does not know")
