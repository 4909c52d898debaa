"""A member's leader lends its view of the swarm to its other ranks while they exchange
(loco.protocols.rank_view): real ZeroMQ sockets in one process, signed as in a keyed swarm."""

from __future__ import annotations

import threading

import pytest
import torch

from loco.protocols.codecs import Compressor, Layout
from loco.protocols.data_phase import DataPhase, Member, Region
from loco.protocols.identity import NodeKey
from loco.protocols.membership import PeerInfo
from loco.protocols.messages import RANK_VIEW
from loco.protocols.rank_view import RelayedView, ViewRelay
from loco.protocols.transport import Transport
from loco.protocols.wire import Message
from tests.conftest import wait_until

KEY = b"swarm key of this test"


@pytest.fixture
def member():
    """Member "a" as two processes (its leader and rank 1: one id, one signing key, two
    endpoints) and member "b", one process."""
    a_key = NodeKey.generate()
    made = {"a0": Transport("a", key=KEY, node_key=a_key), "a1": Transport("a", key=KEY, node_key=a_key),
            "b": Transport("b", key=KEY)}
    yield made
    for t in made.values():
        t.close()


def test_a_rank_stops_waiting_for_a_member_its_leader_sees_leave(member):
    """Rank 1 of "a" waits for "b"'s part of its region, with a deadline far past the test's
    timeout; "b" never sends (it died). Once the leader's DHT view drops "b", rank 1 gives
    "b" up (two looks in a row, as the leader's own wait does) and reports it missing."""
    a0, a1, b = member["a0"], member["a1"], member["b"]
    view = RelayedView(a1)
    view.begin(7, 0, [PeerInfo("b", b.endpoint, session=b.session)])
    phase = DataPhase(a1, Compressor("none"), view.peers, 3600.0, None, 64, 0.0)
    phase.check_s = 0.05
    phase.begin(1, {"b": b.session})
    layout = Layout([(40,)])
    roster = [Member("a", a0.endpoint, 1.0, (a0.endpoint, a1.endpoint)), Member("b", b.endpoint, 1.0)]
    result: dict[str, object] = {}

    def wait_on_b() -> None:
        result["out"] = phase.exchange(7, 0, [torch.ones(20)], roster, Region(1, layout))

    rank = threading.Thread(target=wait_on_b, daemon=True)
    rank.start()
    live = [PeerInfo("b", b.endpoint, session=b.session)]
    with ViewRelay(a0, [a1.endpoint], 7, 0, ["b"], lambda: list(live), check_s=0.05) as relay:
        wait_until(lambda: relay.sent >= 1, 30, "the leader's first view")  # "b" live: the wait goes on
        assert rank.is_alive() and [p.id for p in view.peers()] == ["b"]
        live.clear()  # the leader's DHT no longer shows "b"
        rank.join(timeout=60)
    assert not rank.is_alive(), "rank 1 still waits for the member its leader saw leave"
    assert result["out"] == (None, ["b"])


def test_only_the_members_own_leader_moves_a_ranks_view_and_only_for_the_attempt_it_names(member):
    a0, a1, b = member["a0"], member["a1"], member["b"]
    view = RelayedView(a1)
    start = [PeerInfo("b", b.endpoint, session=b.session)]
    view.begin(7, 1, start)
    # another member (its own key) claiming to be "a": its key is not the member's
    impostor = Transport("a", key=KEY)
    try:
        a0.send(a1.endpoint, Message(RANK_VIEW, round=7, attempt=0, meta={"live": []}))  # an earlier attempt
        wait_until(lambda: a1.bytes_recv > 0, 30, "the leader's view of an earlier attempt")
        assert [p.id for p in view.peers()] == ["b"]
        impostor.send(a1.endpoint, Message(RANK_VIEW, round=7, attempt=1, meta={"live": []}))
        b.send(a1.endpoint, Message(RANK_VIEW, round=7, attempt=1, meta={"live": []}))  # another member
        wait_until(lambda: sum(a1.dropped.values()) >= 2, 30, "the forged views dropped")
        assert [p.id for p in view.peers()] == ["b"]
        # the leader's view for this attempt, sent last, is the one that counts
        a0.send(a1.endpoint, Message(RANK_VIEW, round=7, attempt=1, meta={"live": [["b", "s2"]]}))
        wait_until(lambda: [(p.id, p.session) for p in view.peers()] == [("b", "s2")], 30, "the leader's view")
        assert sum(a1.dropped.values()) == 2, a1.dropped
        assert view.peers()[0].endpoint == b.endpoint
    finally:
        impostor.close()


def test_a_malformed_view_is_dropped_at_the_wire(member):
    a0, a1 = member["a0"], member["a1"]
    view = RelayedView(a1)
    view.begin(1, 0, [])
    for bad in ({"live": [["b"]]}, {"live": [["b", 3]]}, {"live": "b"}, {"live": [], "extra": 1}):
        a0.send(a1.endpoint, Message(RANK_VIEW, round=1, attempt=0, meta=bad))
    wait_until(lambda: a1.dropped.get("BadMeta", 0) == 4, 30, "four malformed views dropped")
    assert view.peers() == []
