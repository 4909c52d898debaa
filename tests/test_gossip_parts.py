"""NoLoCo's gossip data rank to rank (protocols/gossip_parts.py): members of 1, 2 and 3
ranks, each rank with its own socket in one process, exchange the regions of two sections;
declines, late pieces and forged stretches; and the leaders' handshake that comes first."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loco.node.sync import mean_of, norm_outliers
from loco.protocols.codecs import Compressor, Layout
from loco.protocols.gossip import GroupExchange
from loco.protocols.gossip_parts import PartExchange
from loco.protocols.messages import GOSSIP_PART
from loco.protocols.regions import split_bounds
from loco.protocols.transport import Transport
from loco.protocols.wire import Message
from tests.conftest import run_each, wait_until

SHAPES = [(7, 5), (11,), (3, 4)]  # 58 values a section
N = 58


class Members:
    """Members ``m0, m1, ...`` of the given rank counts, every rank with its own transport
    (opened as its member) and ``PartExchange``."""

    def __init__(self, counts: list[int], codec: str = "none"):
        self.counts = counts
        self.ranks = {(m, r): Transport(f"m{m}") for m, k in enumerate(counts) for r in range(k)}
        self.parts = {key: PartExchange(t, Compressor(codec, block=16) if codec != "none" else None)
                      for key, t in self.ranks.items()}

    def endpoints(self, m: int) -> list[str]:
        return [self.ranks[(m, r)].endpoint for r in range(self.counts[m])]

    def exchange(self, vectors: dict[int, list[torch.Tensor]], pairs: dict[int, list[int]], round: int = 0,
                 timeout_s: float = 10.0):
        """Every rank of every member in ``pairs`` (member -> its partners) exchanges its region
        of its member's sections. Returns every rank's result."""
        out = {}

        def run(m: int, r: int) -> None:
            bounds = split_bounds(N, self.counts[m])
            sections = [v[bounds[r]:bounds[r + 1]].clone() for v in vectors[m]]
            partners = {f"m{p}": self.endpoints(p) for p in pairs[m]}
            out[(m, r)] = self.parts[(m, r)].exchange(round, sections, bounds[r], Layout(SHAPES), partners,
                                                      time.monotonic() + timeout_s)

        run_each(run, [key for key in self.ranks if key[0] in pairs])
        return out

    def close(self) -> None:
        for t in self.ranks.values():
            t.close()


@pytest.fixture
def members():
    made: list[Members] = []

    def make(counts, **kw):
        made.append(Members(counts, **kw))
        return made[-1]

    yield make
    for m in made:
        m.close()


def _vectors(n_members: int) -> dict[int, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {m: [torch.randn(N, generator=g), torch.randn(N, generator=g)] for m in range(n_members)}


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_members_of_one_two_and_three_ranks_receive_each_partners_values_over_their_regions(members, codec):
    ms = members([1, 2, 3], codec=codec)
    vectors = _vectors(3)
    out = ms.exchange(vectors, {0: [1, 2], 1: [0, 2], 2: [0, 1]})
    for (m, r), got in out.items():
        bounds = split_bounds(N, ms.counts[m])
        lo, hi = bounds[r], bounds[r + 1]
        assert sorted(got.received) == sorted(f"m{p}" for p in range(3) if p != m) and not got.silent
        for pid, sections in got.received.items():
            p = int(pid[1:])
            for want, have in zip(vectors[p], sections, strict=True):
                if codec == "none":
                    assert torch.equal(have, want[lo:hi])
                else:  # int8: within its block's quantization step
                    assert (have - want[lo:hi]).abs().max() < 0.05
    # every rank sent from its own endpoint
    assert all(t.bytes_sent > 0 for t in ms.ranks.values())
    if codec == "int8":  # a member's ranks decoded the same bits from a sender, however its regions cut them
        whole = {}
        for m in (1, 2):
            whole[m] = torch.cat([out[(m, r)].received["m0"][0] for r in range(ms.counts[m])])
        assert torch.equal(whole[1], whole[2])


def test_a_member_that_did_not_agree_declines_and_a_partner_that_never_sends_costs_the_deadline(members):
    ms = members([2, 1, 1])
    vectors = _vectors(3)
    # m0 believes it averages with m1 and m2; m1 agreed with m0 only; m2 never runs the round
    start = time.monotonic()
    out = ms.exchange(vectors, {0: [1, 2], 1: []}, timeout_s=3.0)
    for r in range(2):
        got = out[(0, r)]
        assert got.declined == ["m1"] and got.silent == ["m2"] and not got.received, got
    assert not out[(1, 0)].received
    assert time.monotonic() - start < 10  # the decline ended m1's wait at once; m2 cost the deadline


def test_pieces_for_a_round_to_come_wait_and_late_ones_are_dropped(members):
    ms = members([1, 2])
    vectors = _vectors(2)
    got = {}
    # m1's ranks start round 0 first; m0 joins later: its pieces were waiting for it
    t = threading.Thread(target=lambda: got.update(ms.exchange(vectors, {1: [0]})))
    t.start()
    # m1's two ranks have sent their pieces (one each) before m0 opens the round
    wait_until(lambda: ms.ranks[(0, 0)].mailbox.held()[0] >= 2, 30, "m1's pieces waiting at m0")
    late = ms.exchange(vectors, {0: [1]})
    t.join(60)
    assert list(late[(0, 0)].received) == ["m1"] and all(list(got[(1, r)].received) == ["m0"] for r in range(2))
    # a piece for the finished round from the partner is dropped silently; a stranger's gets a decline
    stranger = Transport("m9")
    try:
        meta = {"endpoint": stranger.endpoint, "lo": 0, "hi": 3, "numel": N, "codecs": [{}, {}], "frames": [1, 1]}
        stranger.send(ms.ranks[(0, 0)].endpoint, Message(GOSSIP_PART, round=0, meta=meta,
                                                         tensors=[torch.ones(3), torch.ones(3)]))
        declined = stranger.mailbox.take_first(GOSSIP_PART, 0, 0, lambda m: m.meta.get("decline"),
                                               time.monotonic() + 10)
        assert declined is not None and declined.sender == "m0"
    finally:
        stranger.close()


def test_a_stretch_outside_the_region_or_twice_is_refused(members):
    ms = members([2, 1])
    good = Transport("m1")  # a second socket of m1: its pieces count as m1's
    try:
        bounds = split_bounds(N, 2)
        res = {}
        t = threading.Thread(target=lambda: res.update(r=ms.parts[(0, 1)].exchange(
            0, [torch.zeros(bounds[2] - bounds[1])] * 2, bounds[1], Layout(SHAPES), {"m1": [good.endpoint]},
            time.monotonic() + 5)))
        t.start()
        meta = {"endpoint": good.endpoint, "lo": 0, "hi": 4, "numel": N,
                "codecs": [{"pieces": [[1, None, {}]], "span": [0, 4]}] * 2, "frames": [1, 1]}
        good.send(ms.ranks[(0, 1)].endpoint, Message(GOSSIP_PART, round=0, meta=meta,
                                                     tensors=[torch.ones(4), torch.ones(4)]))  # rank 0's stretch
        t.join(30)
        assert res["r"].silent == ["m1"] and not res["r"].received
    finally:
        good.close()


def test_the_handshake_carries_no_data_and_names_the_ranks():
    a, b = Transport("h0"), Transport("h1")
    try:
        ea, eb = GroupExchange(a), GroupExchange(b)
        res = {}
        ranks = [b.endpoint, "tcp://127.0.0.1:1"]
        ta = threading.Thread(target=lambda: res.update(a=ea.exchange(0, {"h1": b.endpoint}, [], 10, numel=116)))
        tb = threading.Thread(target=lambda: res.update(b=eb.exchange(0, {"h0": a.endpoint}, [], 10,
                                                                       extra={"ranks": ranks}, numel=116)))
        ta.start()
        tb.start()
        ta.join(30)
        tb.join(30)
        assert res["a"].received == {"h1": []} and res["a"].metas["h1"]["ranks"] == ranks
        assert res["b"].received == {"h0": []} and "ranks" not in res["b"].metas["h0"]
        # a partner that would send a vector of another length is not agreed with
        res2 = {}
        ta = threading.Thread(target=lambda: res2.update(a=ea.exchange(1, {"h1": b.endpoint}, [], 5, numel=116)))
        tb = threading.Thread(target=lambda: res2.update(b=eb.exchange(1, {"h0": a.endpoint}, [], 5, numel=100)))
        ta.start()
        tb.start()
        ta.join(30)
        tb.join(30)
        assert res2["a"].silent == ["h1"] and res2["b"].silent == ["h0"]
    finally:
        a.close()
        b.close()


def test_the_mean_is_summed_in_sorted_id_order_and_outliers_need_a_median():
    own = [torch.tensor([1.0, 2.0])]
    got = {"b": [torch.tensor([3.0, 4.0])], "c": [torch.tensor([5.0, 6.0])]}
    assert torch.equal(mean_of("a", own, got, ["b", "c"])[0], torch.tensor([3.0, 4.0]))
    assert torch.equal(mean_of("z", own, got, ["b"])[0], torch.tensor([2.0, 3.0]))
    assert norm_outliers({"b": 1.0, "c": 50.0}, 1.2, 10.0) == {"c"}
    assert norm_outliers({"b": 50.0}, 1.0, 0.0) == set()  # the rule turned off
