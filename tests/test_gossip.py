"""NoLoCo's gossip exchange with several peers in one process over real ZeroMQ sockets,
the pairing rule, and the state server's history (CO2's missed reduces)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loco.node.sync import GossipCommunicator
from loco.protocols.gossip import GOSSIP, GroupExchange, random_groups
from loco.protocols.membership import PeerInfo
from loco.protocols.state_sync import StateServer, fetch_state, tensors_hash, vouched, witness_digests
from loco.protocols.transport import Transport
from loco.protocols.wire import Message
from tests.conftest import wait_until


@pytest.fixture
def nodes():
    ts = [Transport(f"g{i}") for i in range(4)]
    exchanges = [GroupExchange(t) for t in ts]
    yield ts, exchanges
    for t in ts:
        t.close()


def _run(calls):
    results = {}

    def go(key, fn):
        results[key] = fn()

    threads = [threading.Thread(target=go, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_random_groups_are_deterministic_pairs_and_merge_the_odd_one_out():
    ids = [f"n{i}" for i in range(7)]
    groups = random_groups(ids, 3, 2, seed=1)
    assert groups == random_groups(list(reversed(ids)), 3, 2, seed=1)  # order of the roster does not matter
    assert sorted(x for g in groups for x in g) == sorted(ids)
    assert sorted(len(g) for g in groups) == [2, 2, 3]
    assert random_groups(ids, 4, 2, seed=1) != groups  # a fresh pairing each round
    assert random_groups(["a"], 0, 2) == [["a"]]
    seen = {tuple(sorted(g)) for r in range(40) for g in random_groups(ids[:4], r, 2)}
    assert len(seen) == 6  # over rounds, every pair of four nodes meets


def test_pair_exchange_swaps_tensors(nodes):
    ts, ex = nodes
    a, b = torch.arange(5, dtype=torch.float32), torch.full((5,), 7.0)
    res = _run({
        0: lambda: ex[0].exchange(0, {"g1": ts[1].endpoint}, [a], 10),
        1: lambda: ex[1].exchange(0, {"g0": ts[0].endpoint}, [b], 10),
    })
    assert torch.equal(res[0].received["g1"][0], b) and torch.equal(res[1].received["g0"][0], a)
    assert res[0].sent_to == ["g1"] and not res[0].silent and not res[0].declined
    assert ts[0].sent_by_kind[GOSSIP] == 1 and dict(ts[0].sent_to) == {"g1": 1}


def test_a_node_that_did_not_pick_us_answers_at_once_with_its_data(nodes):
    ts, ex = nodes
    x, y, z = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 3.0)
    # views differ: g0 thinks it is paired with g2; g2 is paired with g3. g2 adopts g0. (g3
    # starts only after g0 is done: g2, waiting on g3, cannot have finished before g0's data came)
    res = {}
    g2 = threading.Thread(target=lambda: res.update({2: ex[2].exchange(0, {"g3": ts[3].endpoint}, [y], 30)}))
    g2.start()
    res[0] = ex[0].exchange(0, {"g2": ts[2].endpoint}, [x], 30)
    res[3] = ex[3].exchange(0, {"g2": ts[2].endpoint}, [z], 30)
    g2.join(30)
    assert list(res[0].received) == ["g2"] and torch.equal(res[0].received["g2"][0], y)
    assert res[0].wait_s < 15  # not the 30 s deadline
    assert sorted(res[2].received) == ["g0", "g3"] and res[2].adopted == ["g0"]
    assert sorted(res[2].sent_to) == ["g0", "g3"]
    assert list(res[3].received) == ["g2"]


def test_a_cycle_of_choices_ends_at_once_with_every_node_paired(nodes):
    # g0 chose g1, g1 chose g2, g2 chose g3, g3 chose g0: each waits on a node that waits
    # on another. Adoption answers every one at once; nobody waits for the deadline.
    ts, ex = nodes
    start = time.monotonic()
    res = _run({i: (lambda i=i: ex[i].exchange(0, {f"g{(i + 1) % 4}": ts[(i + 1) % 4].endpoint},
                                               [torch.full((2,), float(i))], 60)) for i in range(4)})
    assert time.monotonic() - start < 30
    for i in range(4):
        # the one it chose answers at once: with its data (adopting it), or with a decline
        # if it had finished already (the one that chose this node then was adopted here)
        assert set(res[i].received) <= {f"g{(i + 1) % 4}", f"g{(i - 1) % 4}"}
        assert not res[i].silent and res[i].wait_s < 30
        for sender, (got,) in res[i].received.items():
            assert torch.equal(got, torch.full((2,), float(sender[1:])))


def test_past_its_adoption_limit_a_node_declines_at_once():
    ts = [Transport(f"g{i}") for i in range(4)]
    try:  # g2's exchange stays open, waiting on g3 (which runs no exchange), while g0 and g1 pick it
        ex = [GroupExchange(ts[0]), GroupExchange(ts[1]), GroupExchange(ts[2], max_adopted=1)]
        opened = threading.Event()
        ts[3].on(GOSSIP, lambda m: opened.set())
        results = {}
        worker = threading.Thread(target=lambda: results.update(
            g2=ex[2].exchange(0, {"g3": ts[3].endpoint}, [torch.ones(2)], 60)))
        worker.start()
        assert opened.wait(10)
        first = ex[0].exchange(0, {"g2": ts[2].endpoint}, [torch.ones(2)], 30)
        second = ex[1].exchange(0, {"g2": ts[2].endpoint}, [torch.ones(2)], 30)
        ts[3].send(ts[2].endpoint, Message(GOSSIP, round=0, meta={"decline": True}))  # now g2's round ends
        worker.join(30)
        assert results["g2"].declined == ["g3"]
        assert list(first.received) == ["g2"]  # adopted
        assert second.declined == ["g2"] and second.wait_s < 15  # over the limit: declined, not kept waiting
        assert list(results["g2"].received) == ["g0"]
    finally:
        for t in ts:
            t.close()


def test_a_node_that_skipped_rounds_declines_their_data_at_once(nodes):
    ts, ex = nodes
    ex[1].skip_to(7)  # g1 adopted a state at round 7: it runs no exchange before it
    res = ex[0].exchange(6, {"g1": ts[1].endpoint}, [torch.ones(2)], 30)
    assert res.declined == ["g1"] and res.wait_s < 15


def test_data_for_a_finished_round_is_declined_at_once(nodes):
    ts, ex = nodes
    ex[1].exchange(5, {}, [torch.ones(2)], 1)  # g1 is done with round 5
    start = time.monotonic()
    res = ex[0].exchange(5, {"g1": ts[1].endpoint}, [torch.ones(2)], 30)
    assert res.declined == ["g1"] and time.monotonic() - start < 15


def test_silent_partner_costs_the_deadline_only(nodes):
    ts, ex = nodes
    res = ex[0].exchange(0, {"g1": ts[1].endpoint}, [torch.ones(2)], 0.5)
    assert res.silent == ["g1"] and not res.received and res.wait_s < 5


def test_a_partner_that_leaves_the_swarm_is_not_waited_for():
    a, b = Transport("g0"), Transport("g1")
    view = {"g0", "g1"}
    try:
        ex = GroupExchange(a, live=lambda: set(view))
        threading.Timer(0.5, view.discard, args=("g1",)).start()  # g1's DHT record expires
        r = ex.exchange(0, {"g1": b.endpoint}, [torch.ones(3)], timeout_s=60)
        assert r.silent == ["g1"] and not r.received
        assert r.wait_s < 30  # gave up once g1 left the view, not at the 60 s deadline
    finally:
        a.close()
        b.close()


def test_malformed_gossip_is_treated_as_silence(nodes):
    ts, ex = nodes
    ts[1].send(ts[0].endpoint, Message(GOSSIP, round=0, meta={"endpoint": ts[1].endpoint, "parts": "x"},
                                       tensors=[torch.ones(2)]))
    ts[2].send(ts[0].endpoint, Message(GOSSIP, round=0, meta={
        "endpoint": ts[2].endpoint, "parts": [{"count": 1, "numel": 2}]}, tensors=[torch.tensor([1.0, float("nan")])]))
    res = ex[0].exchange(0, {"g1": ts[1].endpoint, "g2": ts[2].endpoint}, [torch.ones(2)], 3)
    assert sorted(res.silent) == ["g1", "g2"] and not res.received


def test_gossip_communicator_means_agree_bit_for_bit(nodes):
    ts, ex = nodes

    def roster(me):
        return lambda: [PeerInfo(t.node_id, t.endpoint, 0) for t in ts if t.node_id != me]

    comms = [GossipCommunicator(ex[i], ts[i].node_id, roster(ts[i].node_id), 2, 10, seed=0, peer_round=lambda: 0)
             for i in range(4)]
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(40, 25, generator=g) for _ in range(4)]
    res = _run({i: (lambda i=i: comms[i].group_mean([inputs[i], inputs[i][0]], 0)) for i in range(4)})
    groups = random_groups([t.node_id for t in ts], 0, 2, seed=0)
    for group in groups:
        idx = [int(x[1:]) for x in group]
        want = (inputs[idx[0]] + inputs[idx[1]]) / 2
        for i in idx:
            assert res[i].group_size == 2 and list(res[i].members) == [x for x in group if x != f"g{i}"]
            torch.testing.assert_close(res[i].tensors[0], want)
            torch.testing.assert_close(res[i].tensors[1], want[0])
        assert torch.equal(res[idx[0]].tensors[0], res[idx[1]].tensors[0])


def test_state_server_keeps_history_and_answers_the_oldest_matching_round():
    a, b = Transport("s0"), Transport("s1")
    try:
        server = StateServer(a, kind="CO2_RESULT", keep=2)
        for r in (3, 4, 5):
            server.publish(r, [torch.full((2,), float(r))], {"r": r})
        snap = fetch_state(b, a.endpoint, 4, timeout_s=10, kind="CO2_RESULT")
        assert snap is not None and snap.round == 4 and snap.tensors[0][0].item() == 4.0
        snap = fetch_state(b, a.endpoint, 3, timeout_s=10, kind="CO2_RESULT")
        assert snap is not None and snap.round == 4  # round 3 is gone: the caller checks the round
        # a request for a future round is parked until it is published
        threading.Timer(0.5, lambda: server.publish(6, [torch.zeros(2)], {})).start()
        snap = fetch_state(b, a.endpoint, 6, timeout_s=10, kind="CO2_RESULT")
        assert snap is not None and snap.round == 6
        assert fetch_state(b, a.endpoint, 0, timeout_s=1) is None  # no plain STATE server on a
    finally:
        a.close()
        b.close()


def test_compressed_exchange_delivers_what_the_sender_decoded():
    from loco.protocols.codecs import Compressor, Layout
    from loco.protocols.flat import flat_of

    a, b = Transport("c0"), Transport("c1")
    try:
        ca, cb = Compressor("int8", block=32), Compressor("int8", block=32)
        ea, eb = GroupExchange(a, ca), GroupExchange(b, cb)
        g = torch.Generator().manual_seed(0)
        xa = [torch.randn(10, 6, generator=g), torch.randn(6, generator=g)]
        xb = [torch.randn(10, 6, generator=g), torch.randn(6, generator=g)]
        # what a's codec will produce for its vector (a separate compressor: same input, same bits)
        _, _, want = Compressor("int8", block=32).encode("gossip", flat_of(xa), 0, Layout.of(xa))
        res = _run({0: lambda: ea.exchange(0, {"c1": b.endpoint}, xa, 10),
                    1: lambda: eb.exchange(0, {"c0": a.endpoint}, xb, 10)})
        got = res[1].received["c0"]
        assert [t.shape for t in got] == [t.shape for t in xa]
        assert torch.equal(torch.cat([t.reshape(-1) for t in got]), want)
        assert a.bytes_sent < 0.5 * 4 * sum(t.numel() for t in xa) + 2000  # int8, not float32
    finally:
        a.close()
        b.close()


def test_a_state_served_by_one_peer_is_checked_against_what_a_second_holds():
    """A source serving a state of its own (a liar, or a replica left alone) is not followed
    when another peer holds a different state at that round; one that holds the same state
    vouches for it; a peer without that round has nothing to say."""
    source, witness, other, joiner = (Transport(f"w{i}") for i in range(4))
    try:
        servers = [StateServer(t) for t in (source, witness, other)]
        honest = [torch.arange(6, dtype=torch.float32)]
        servers[0].publish(7, [torch.full((6,), 1e6)], {})  # the source's state of round 7: poisoned
        servers[1].publish(7, honest, {})
        servers[2].publish(9, honest, {})  # (this one has moved on: round 7 is not among its snapshots)
        snap = fetch_state(joiner, source.endpoint, 7, timeout_s=10)
        answers = wait_until(lambda: (a := witness_digests(joiner, [witness.endpoint, other.endpoint], 7)) and
                             a[witness.endpoint] and a, 30, "the witness's hash")  # (hashed in the background)
        assert answers == {witness.endpoint: tensors_hash(honest), other.endpoint: ""}
        assert not vouched(snap.digest, answers)
        assert vouched(tensors_hash(honest), answers)
        assert vouched(snap.digest, {other.endpoint: ""}) and vouched(snap.digest, {})  # nobody to compare with
        assert witness_digests(joiner, ["tcp://127.0.0.1:1"], 7, timeout_s=0.5) == {}  # no answer: no word
    finally:
        for t in (source, witness, other, joiner):
            t.close()
