"""A state served in parts (every rank of a member its own region, from its own endpoint):
its hash computed from the regions one at a time equals the hash of the whole, and a
requester puts the parts together and checks them, over real transports."""

from __future__ import annotations

import math
import random

import pytest
import torch

from loco.protocols.messages import CO2_RESULT, CO2_RESULT_PART, STATE_PART
from loco.protocols.regions import split_bounds
from loco.protocols.state_sync import StateServer, StreamHash, fetch_state, parts_meta, tensors_hash
from loco.protocols.transport import Transport


def _specs(ts):
    return [(t.dtype, tuple(t.shape)) for t in ts]


@pytest.mark.parametrize("seed", range(5))
def test_a_stream_hash_of_bytes_cut_anywhere_is_the_hash_of_the_tensors(seed):
    rng = random.Random(seed)
    ts = [torch.randn(3, 4), torch.empty(0), torch.arange(7, dtype=torch.int64), torch.randn(5).to(torch.bfloat16),
          torch.empty(2, 0), torch.randn(1)]
    raw = torch.cat([t.reshape(-1).view(torch.uint8) for t in ts])
    cuts = sorted({0, raw.numel(), *(rng.randrange(raw.numel()) for _ in range(rng.randrange(1, 12)))})
    for prefix in (0, 1, 2, 3, len(ts)):
        stream = StreamHash(_specs(ts), prefix)
        for a, b in zip(cuts, cuts[1:], strict=False):
            stream.update(raw[a:b])
        assert stream.digests() == (tensors_hash(ts[:prefix]), tensors_hash(ts))
    whole = StreamHash(_specs(ts), 2)
    whole.update(raw)
    assert whole.digests()[0] == tensors_hash(ts[:2])


def test_a_stream_hash_refuses_too_few_or_too_many_bytes():
    ts = [torch.randn(4)]
    short = StreamHash(_specs(ts))
    short.update(torch.randn(3))
    with pytest.raises(ValueError, match="ended inside tensor 0"):
        short.digests()
    with pytest.raises(ValueError, match="past the end"):
        StreamHash(_specs(ts)).update(torch.randn(5))


class Member:
    """A member of ``k`` ranks serving φ and a momentum the way split_state.py does: rank r
    serves its region of both (STATE_PART), the leader the hash of the whole and where the
    parts are (STATE)."""

    def __init__(self, shapes, k):
        self.shapes = shapes
        self.transports = [Transport(f"m-rank{r}") for r in range(k)]
        self.parts = [StateServer(t, kind=STATE_PART, keep=2, hashed=False) for t in self.transports]
        self.server = StateServer(self.transports[0])
        self.total = sum(math.prod(s) for s in shapes)
        self.bounds = split_bounds(self.total, k)

    def publish(self, round, anchor, buf, tamper=None):
        stream = StreamHash([(torch.float32, s) for s in [*self.shapes, *self.shapes]], len(self.shapes))
        for flat in (anchor, buf):
            for a, b in zip(self.bounds, self.bounds[1:], strict=False):
                stream.update(flat[a:b])
        for r, (a, b) in enumerate(zip(self.bounds, self.bounds[1:], strict=False)):
            part = [anchor[a:b], buf[a:b]]
            if r == tamper:
                part = [part[0] + 1, part[1]]
            self.parts[r].publish(round, part, {})
        parts = parts_meta([t.endpoint for t in self.transports], round, [self.shapes, self.shapes])
        return self.server.publish(round, [], {"outer_steps": round, "parts": parts}, prefix=len(self.shapes),
                                   digests=stream.digests())

    def close(self):
        for s in [self.server, *self.parts]:
            s.close()
        for t in self.transports:
            t.close()


def _views(flat, shapes):
    out, offset = [], 0
    for s in shapes:
        out.append(flat[offset:offset + math.prod(s)].view(s))
        offset += math.prod(s)
    return out


@pytest.fixture
def member_and_joiner():
    made = []

    def make(shapes, k):
        m = Member(shapes, k)
        made.append(m)
        return m, m.transports[0]

    joiner = Transport("joiner")
    yield make, joiner
    for m in made:
        m.close()
    joiner.close()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_state_served_in_parts_is_fetched_whole_with_the_hash_of_the_whole(member_and_joiner, k):
    make, joiner = member_and_joiner
    shapes = [(5, 3), (7,), (2, 2, 2)]
    member, leader = make(shapes, k)
    anchor, buf = torch.randn(member.total), torch.randn(member.total)
    whole = [*_views(anchor, shapes), *_views(buf, shapes)]
    published = member.publish(4, anchor, buf)
    # what peers compare: the hash a one-process member computes of the same state
    assert published.digest == tensors_hash(whole) and published.prefix_digest == tensors_hash(whole[:3])
    snap = fetch_state(joiner, leader.endpoint, 4, timeout_s=30)
    assert snap is not None and snap.round == 4 and snap.meta == {"outer_steps": 4}  # ("parts" is the wire's)
    assert snap.digest == tensors_hash(whole)
    assert [tuple(t.shape) for t in snap.tensors] == [*shapes, *shapes]
    assert all(torch.equal(a, b) for a, b in zip(snap.tensors, whole, strict=True))


def test_parts_carry_no_hash_of_their_own(member_and_joiner):
    """A part is never hashed by its server: the whole is checked against the leader's hash."""
    make, joiner = member_and_joiner
    member, leader = make([(6,), (4,)], 2)
    anchor, buf = torch.randn(member.total), torch.randn(member.total)
    member.publish(3, anchor, buf)
    for server in member.parts:
        part = server.published(3)
        assert part is not None and part.digest == "" and part.prefix_digest == ""
    assert fetch_state(joiner, leader.endpoint, 3, timeout_s=30) is not None


def test_a_tampered_part_fails_the_hash_of_the_whole(member_and_joiner):
    make, joiner = member_and_joiner
    member, leader = make([(6,), (4,)], 2)
    member.publish(2, torch.randn(member.total), torch.randn(member.total), tamper=1)
    assert fetch_state(joiner, leader.endpoint, 2, timeout_s=30) is None


def test_a_part_no_longer_kept_or_never_served_fails_the_fetch_in_time(member_and_joiner):
    make, joiner = member_and_joiner
    member, leader = make([(6,), (4,)], 2)
    member.publish(2, torch.randn(member.total), torch.randn(member.total))
    # rank 1 has moved on twice since (it keeps 2): its part of round 2 is gone
    for r in (3, 4):
        member.parts[1].publish(r, [torch.zeros(5), torch.zeros(5)], {})
    assert fetch_state(joiner, leader.endpoint, 2, timeout_s=30) is None
    # parts at an endpoint nobody serves: the fetch ends at its deadline, with nothing
    parts = parts_meta([leader.endpoint, "tcp://127.0.0.1:9"], 5, [[(6,), (4,)], [(6,), (4,)]])
    member.server.publish(5, [], {"parts": parts}, digests=("", "x"))
    assert fetch_state(joiner, leader.endpoint, 5, timeout_s=2) is None


@pytest.mark.parametrize("parts", [
    "not a map", {"endpoints": [], "round": 1, "sections": []},
    {"endpoints": ["tcp://127.0.0.1:9"], "round": 1, "sections": [[[-1]]]},
    {"endpoints": ["x"] * 2000, "round": 1, "sections": []},
    {"endpoints": ["x"], "round": "1", "sections": []},
    {"endpoints": ["x"], "round": 1, "sections": [], "more": 1},
])
def test_a_malformed_parts_layout_is_rejected(member_and_joiner, parts):
    make, joiner = member_and_joiner
    member, leader = make([(6,)], 1)
    member.server.publish(1, [], {"parts": parts}, digests=("", "x"))
    assert fetch_state(joiner, leader.endpoint, 1, timeout_s=30) is None


def test_a_co2_mean_served_in_parts_is_fetched_whole_and_a_kind_never_served_in_parts_refuses_them(
        member_and_joiner, caplog):
    """A CO2 reduce's mean, as a member of several ranks serves it (split_state.py): every
    rank its region (CO2_RESULT_PART), the leader the hash of the whole mean, layer by
    layer, and where the parts are (CO2_RESULT); a kind never served in parts that names
    parts is refused."""
    make, joiner = member_and_joiner
    member, leader = make([(4, 3), (5,)], 2)
    layers = [(12,), (5,)]  # the mean is served one flat tensor per layer
    mean = torch.randn(member.total)
    parts = [StateServer(t, kind=CO2_RESULT_PART, keep=4, hashed=False) for t in member.transports]
    results = StateServer(leader, kind=CO2_RESULT, keep=4)
    stream = StreamHash([(torch.float32, s) for s in layers])
    for r, (a, b) in enumerate(zip(member.bounds, member.bounds[1:], strict=False)):
        parts[r].publish(7, [mean[a:b]], {})
        stream.update(mean[a:b])
    meta = {"ok": True, "group_size": 2, "parts": parts_meta([t.endpoint for t in member.transports], 7, [layers])}
    results.publish(7, [], meta, digests=("", stream.digests()[1]))
    try:
        snap = fetch_state(joiner, leader.endpoint, 7, timeout_s=30, kind=CO2_RESULT)
        assert snap is not None and snap.meta == {"ok": True, "group_size": 2}
        assert snap.digest == tensors_hash(_views(mean, layers))
        assert torch.equal(torch.cat(snap.tensors), mean)
        other = StateServer(leader, kind=STATE_PART)  # (a part: never served in parts itself)
        other.publish(7, [], meta, digests=("", stream.digests()[1]))
        assert fetch_state(joiner, leader.endpoint, 7, timeout_s=30, kind=STATE_PART) is None
        assert "names parts, which a STATE_PART is never served in" in caplog.text
        other.close()
    finally:
        for s in [results, *parts]:
            s.close()
