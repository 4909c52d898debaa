"""Who sends, averages and receives which stretch of a round's flat vector, when members
are made of several processes (ranks), each with its own endpoint and its own stretch.

A member of ``k`` ranks splits the vector into ``k`` near-equal contiguous *regions*, one
per rank, in rank order: rank ``r`` holds ``[bounds[r], bounds[r + 1])`` of
``split_bounds(total, k)``. That layout depends only on the vector's length and the rank
count, never on how the member shards its model inside (FSDP's rows, DDP's replicas), so
members of any rank counts meet in global coordinates: a 2-rank member's rank 1 and a
1-rank member exchange exactly the stretch both hold.

As in the one-process round, the vector is cut into one *part* per member (roster order)
and member ``j`` averages part ``j``; of that part each rank of ``j`` averages what lies in
its own region, so a member's averaging is spread over its ranks too and no rank handles
anything outside its region. Everything is cut at every region and part boundary of the
round (and into chunks of at most ``chunk`` values), so each *segment* has one owner rank
and lies inside one region of every member: it travels as one message from each member's
holder to the owner, and back. Every member computes the same segments from the roster.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_bounds(numel: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` near-equal contiguous slices of a ``numel`` vector."""
    base, extra = divmod(numel, parts)
    bounds = [0]
    for j in range(parts):
        bounds.append(bounds[-1] + base + (1 if j < extra else 0))
    return bounds


@dataclass(frozen=True)
class Segment:
    lo: int
    hi: int
    owner: int  # the member (roster index) that averages it
    holders: tuple[int, ...]  # per member: which of its ranks holds it (the owner's: the averaging rank)


class RoundLayout:
    """The segments of a ``total``-long vector averaged by members of ``rank_counts`` ranks
    (roster order), in chunks of at most ``chunk`` values."""

    def __init__(self, total: int, rank_counts: list[int], chunk: int):
        if not rank_counts or min(rank_counts) < 1:
            raise ValueError(f"every member needs at least one rank, got {rank_counts}")
        self.total = total
        self.regions = [split_bounds(total, k) for k in rank_counts]
        self.parts = split_bounds(total, len(rank_counts))
        cuts = sorted({*self.parts, *(b for bounds in self.regions for b in bounds)})
        self.segments: list[Segment] = []
        owner = 0
        holders = [0] * len(rank_counts)
        for a, b in zip(cuts, cuts[1:], strict=False):
            if a == b:
                continue
            while self.parts[owner + 1] <= a:
                owner += 1
            for i, bounds in enumerate(self.regions):
                while bounds[holders[i] + 1] <= a:
                    holders[i] += 1
            for lo in range(a, b, max(1, chunk)):
                self.segments.append(Segment(lo, min(lo + chunk, b), owner, tuple(holders)))

    def region(self, member: int, rank: int) -> tuple[int, int]:
        bounds = self.regions[member]
        return bounds[rank], bounds[rank + 1]

    def held_by(self, member: int, rank: int) -> list[Segment]:
        """The segments in that rank's region."""
        return [s for s in self.segments if s.holders[member] == rank]

    def owned_by(self, member: int, rank: int) -> list[Segment]:
        """The segments that rank averages."""
        return [s for s in self.segments if s.owner == member and s.holders[member] == rank]
