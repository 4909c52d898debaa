"""Members of several processes (ranks) averaging their regions of a round's vector:
the segment layout, and the data phases over real ZeroMQ sockets in one process, with
members of 1, 2 and 3 ranks in one round."""

from __future__ import annotations

import pytest
import torch

from loco.protocols.codecs import Compressor, Layout
from loco.protocols.data_phase import DataPhase, Member, Region
from loco.protocols.membership import PeerInfo
from loco.protocols.regions import RoundLayout, split_bounds
from loco.protocols.transport import Transport
from tests.conftest import run_each


def test_every_segment_has_one_owner_rank_and_lies_in_one_region_of_every_member():
    total, counts = 103, [1, 2, 3]
    plan = RoundLayout(total, counts, chunk=10)
    covered = [0] * total
    for seg in plan.segments:
        assert 0 < seg.hi - seg.lo <= 10
        assert seg.owner == (seg.lo // 10) % 3  # blocks of 10, round-robin over the members
        for i in range(seg.lo, seg.hi):
            covered[i] += 1
        for member, rank in enumerate(seg.holders):
            lo, hi = plan.region(member, rank)
            assert lo <= seg.lo and seg.hi <= hi
    assert covered == [1] * total
    # every rank of every member owns a share: all of them send and average in each phase
    for member, k in enumerate(counts):
        for rank in range(k):
            held = sum(s.hi - s.lo for s in plan.held_by(member, rank))
            owned = sum(s.hi - s.lo for s in plan.owned_by(member, rank))
            assert 0 < owned < held
    # a short vector still gives every region blocks of every member
    short = RoundLayout(12, [2, 2], chunk=1000)
    assert [(s.lo, s.hi, s.owner) for s in short.segments] == [(0, 3, 0), (3, 6, 1), (6, 9, 0), (9, 12, 1)]


def test_a_layout_needs_a_rank_per_member():
    with pytest.raises(ValueError, match="at least one rank"):
        RoundLayout(10, [1, 0], chunk=4)


class RankedMembers:
    """Members ``m0, m1, ...`` of the given rank counts, every rank with its own socket; a
    rank's data phase sees every member live (the DHT is exercised by the swarm tests)."""

    def __init__(self, counts: list[int], codec: str = "none", chunk_bytes: int = 64):
        self.ranks = {(m, r): Transport(f"m{m}") for m, k in enumerate(counts) for r in range(k)}
        live = [PeerInfo(f"m{m}", self.ranks[(m, 0)].endpoint) for m in range(len(counts))]
        self.phases = {key: DataPhase(t, Compressor(codec), lambda: live, 10.0, None, chunk_bytes, 0.0)
                       for key, t in self.ranks.items()}
        self.roster = [Member(f"m{m}", self.ranks[(m, 0)].endpoint, 1.0,
                              tuple(self.ranks[(m, r)].endpoint for r in range(k)) if k > 1 else ())
                       for m, k in enumerate(counts)]
        self.counts = counts

    def average(self, vectors: list[torch.Tensor], shapes) -> dict[tuple[int, int], torch.Tensor | None]:
        """Every rank's averaged region of its member's vector."""
        layout = Layout(shapes)
        out: dict[tuple[int, int], torch.Tensor | None] = {}

        def run(m: int, r: int) -> None:
            bounds = split_bounds(layout.total, self.counts[m])
            region = vectors[m][bounds[r]:bounds[r + 1]].clone()
            flat, missing = self.phases[(m, r)].exchange(0, 0, [region], self.roster, Region(r, layout))
            out[(m, r)] = None if missing else flat.clone()

        run_each(run, list(self.ranks))
        return out

    def close(self) -> None:
        for t in self.ranks.values():
            t.close()


@pytest.fixture
def ranked():
    made: list[RankedMembers] = []

    def make(counts, **kw):
        made.append(RankedMembers(counts, **kw))
        return made[-1]

    yield make
    for m in made:
        m.close()


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_members_of_one_two_and_three_ranks_average_their_regions(ranked, codec):
    shapes = [(7, 5), (11,), (3, 4)]  # 58 values, in segments of at most 16 (64 bytes)
    members = ranked([1, 2, 3], codec=codec)
    torch.manual_seed(0)
    vectors = [torch.randn(58) for _ in range(3)]
    mean = sum(vectors) / 3
    out = members.average(vectors, shapes)
    whole = {}
    for m, k in enumerate([1, 2, 3]):
        bounds = split_bounds(58, k)
        whole[m] = torch.cat([out[(m, r)] for r in range(k)])
        assert whole[m].shape == (58,) and all(out[(m, r)].numel() == bounds[r + 1] - bounds[r] for r in range(k))
    if codec == "none":
        assert torch.allclose(whole[0], mean, atol=1e-6)
    else:  # int8 keeps every value within its block's quantization step
        assert (whole[0] - mean).abs().max() < 0.1
    # every member holds the same bits, whatever its rank count and the codec
    assert torch.equal(whole[0], whole[1]) and torch.equal(whole[0], whole[2])
    # rank 1 of the 3-rank member and rank 1 of the 2-rank member sent part of their own traffic
    assert members.ranks[(2, 1)].bytes_sent > 0 and members.ranks[(1, 1)].bytes_sent > 0


def test_a_rank_that_brings_the_wrong_region_is_refused(ranked):
    members = ranked([2, 1])
    layout = Layout([(10,)])
    with pytest.raises(ValueError, match=r"rank 1 of 2 brings 4 values; its region of the 10-long vector is \[5, 10\)"):
        members.phases[(0, 1)].exchange(0, 0, [torch.zeros(4)], members.roster, Region(1, layout))
