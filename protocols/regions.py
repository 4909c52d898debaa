"""Who sends, averages and receives which stretch of a round's flat vector, when members
are made of several processes (ranks), each with its own endpoint and its own stretch.

A member of ``k`` ranks splits the vector into ``k`` near-equal contiguous *regions*, one
per rank, in rank order: rank ``r`` holds ``[bounds[r], bounds[r + 1])`` of
``split_bounds(total, k)``. That layout depends only on the vector's length and the rank
count, never on how the member shards its model inside (FSDP's rows, DDP's replicas), so
members of any rank counts meet in global coordinates: a 2-rank member's rank 1 and a
1-rank member exchange exactly the stretch both hold.

Averaging is spread the same way: the vector is cut into blocks of ``chunk`` values (fewer,
down to ``n`` per region, for a short vector) and
block ``b`` is averaged by member ``b mod n`` (roster order), by the rank of that member
whose region holds it. Round-robin blocks, not one contiguous part per member, so that
every rank's region holds blocks of every member: in each phase all ranks of a member send
at once (with contiguous parts, a part could lie in one rank's region and leave the
member's other ranks idle in that phase). Everything is further cut at every region
boundary, so each *segment* has one owner rank and lies inside one region of every member:
it travels as one message from each member's holder to the owner, and back. Every member
computes the same segments from the roster.
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
    (roster order), in blocks of at most ``chunk`` values."""

    def __init__(self, total: int, rank_counts: list[int], chunk: int):
        if not rank_counts or min(rank_counts) < 1:
            raise ValueError(f"every member needs at least one rank, got {rank_counts}")
        n = len(rank_counts)
        # at least n blocks per region of the member of most ranks, however short the vector
        chunk = max(1, min(chunk, -(-total // (n * max(rank_counts)))))
        self.total = total
        self.regions = [split_bounds(total, k) for k in rank_counts]
        cuts = sorted({*range(0, total, chunk), total, *(b for bounds in self.regions for b in bounds)})
        self.segments: list[Segment] = []
        holders = [0] * n
        for a, b in zip(cuts, cuts[1:], strict=False):
            if a == b:
                continue
            for i, bounds in enumerate(self.regions):
                while bounds[holders[i] + 1] <= a:
                    holders[i] += 1
            self.segments.append(Segment(a, b, (a // chunk) % n, tuple(holders)))

    def region(self, member: int, rank: int) -> tuple[int, int]:
        bounds = self.regions[member]
        return bounds[rank], bounds[rank + 1]

    def held_by(self, member: int, rank: int) -> list[Segment]:
        """The segments in that rank's region."""
        return [s for s in self.segments if s.holders[member] == rank]

    def owned_by(self, member: int, rank: int) -> list[Segment]:
        """The segments that rank averages."""
        return [s for s in self.segments if s.owner == member and s.holders[member] == rank]
