"""The swarm simulator (scripts/sim_scale.py) against timelines worked out by hand, and its
failure handling. Its predictions against real swarms of 4 and 8 nodes are checked in
tests/test_scale.py (``make scale``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sim_scale", REPO / "scripts" / "sim_scale.py")
sim = importlib.util.module_from_spec(spec)
sys.modules["sim_scale"] = sim
spec.loader.exec_module(sim)

LAT = 0.1  # one-way latency, s
BW = 8e6  # uplink, bit/s: 1 MB/s
V = 1e6  # one vector, bytes: 1 s on the wire
CTL = sim.CONTROL_BYTES * 8 / BW  # a control message on the wire
DHT = 0.01


def _setting(nodes: int, **kw) -> sim.Setting:
    return sim.Setting(nodes=nodes, rounds=kw.pop("rounds", 1), payload_bytes=V, uplink_bps=np.full(nodes, BW),
                       latency_s=np.full((nodes, nodes), LAT), compute_s=lambda i, r: 10.0, dht_s=DHT, **kw)


def test_two_node_all_reduce_follows_the_protocol_step_by_step():
    rec = {x.node: x for x in sim.simulate(_setting(2), "diloco")}
    go = 10.0 + DHT
    join = go + CTL + LAT  # node 1's JOIN reaches the leader (node 0)
    roster1 = join + CTL + LAT  # the leader's ROSTER reaches node 1 (node 0 has it at `join`)
    part = V / 2 * 8 / BW  # each member owns half the vector
    # reduce-scatter: node 0 sends once its ROSTER to node 1 has left its uplink
    p0_at_1 = join + CTL + part + LAT
    p1_at_0 = roster1 + part + LAT
    # all-gather: owner 0 averages when node 1's part came; owner 1 when node 0's came and
    # its own uplink is free
    avg0_at_1 = p1_at_0 + part + LAT
    avg1_at_0 = max(p0_at_1, roster1 + part) + part + LAT
    done1_at_leader = avg0_at_1 + CTL + LAT
    decide = max(avg1_at_0, done1_at_leader)
    assert rec[0].end == pytest.approx(decide)
    assert rec[1].end == pytest.approx(decide + CTL + LAT)
    assert rec[0].comm_s == pytest.approx(decide - 10.0)
    assert all(x.status == "ok" and x.group == 2 and x.attempts == 1 for x in rec.values())
    # each sends half the vector twice plus two control messages
    assert rec[0].bytes_sent == rec[1].bytes_sent == pytest.approx(V + 2 * sim.CONTROL_BYTES)


def test_gossip_pair_waits_for_its_partner_data():
    slow = _setting(2)
    slow.compute_s = lambda i, r: 10.0 + 3.0 * i  # node 1 is 3 s slower
    rec = {x.node: x for x in sim.simulate(slow, "noloco")}
    assert rec[1].end == pytest.approx(13.0 + DHT)  # the fast one's data came long ago
    # the fast one waits for the slow partner's vector
    assert rec[0].end == pytest.approx(13.0 + DHT + V * 8 / BW + LAT)
    assert rec[0].comm_s == pytest.approx(3.0 + DHT + V * 8 / BW + LAT)
    assert all(x.status == "ok" and x.group == 2 and x.bytes_sent == V for x in rec.values())


def test_a_node_dead_before_the_round_costs_its_record_expiry_then_the_rest_average():
    s = _setting(3, rounds=2, deaths={(2, 0): 5.0})  # node 2 dies 5 s into its compute
    recs = sim.simulate(s, "diloco")
    first = {x.node: x for x in recs if x.round == 0}
    ttl, check = s.ttl_s, s.check_s
    assert first[2].status == "died"
    for n in (0, 1):
        assert first[n].status == "ok" and first[n].group == 2
        # the leader waited until node 2's record expired (ttl after its last refresh, which
        # was at most ttl/3 before it died) and two absence checks saw it gone
        # then the data phases (under 3 s here)
        assert 5.0 + 2 / 3 * ttl + check <= first[n].end <= 5.0 + ttl + 2 * check + 3
    second = [x for x in recs if x.round == 1]
    assert {x.node for x in second} == {0, 1, 3}  # a fresh node took the dead one's place
    assert all(x.status == "ok" and x.group == 3 for x in second)


def test_a_member_dead_after_joining_makes_the_round_retry_without_it():
    s = _setting(3, deaths={(2, 0): 10.0 + DHT + 0.001})  # its JOIN left, then it died
    rec = {x.node: x for x in sim.simulate(s, "diloco")}
    assert rec[2].status == "died"
    assert rec[0].status == rec[1].status == "ok" and rec[0].group == 2 and rec[0].attempts == 2
    # the first attempt waited for node 2's parts until it was noticed gone
    assert rec[0].comm_s > 2 / 3 * s.ttl_s
    # two attempts' data: a third of the vector to each of two (first), then half to one
    assert rec[0].bytes_sent > V * (2 / 3 + 1 / 2) * 2 - 1


def test_gossip_partner_that_dies_leaves_the_node_alone_once_noticed():
    s = _setting(2, deaths={(1, 0): 2.0})
    rec = {x.node: x for x in sim.simulate(s, "noloco")}
    assert rec[1].status == "died" and rec[0].status == "alone"
    assert 2.0 + 2 / 3 * s.ttl_s + s.check_s <= rec[0].end <= 2.0 + s.ttl_s + 2 * s.check_s


def test_all_reduce_sends_two_vectors_per_node_at_any_size_gossip_one_per_partner():
    for n in (4, 16, 64):
        rows = {a: sim.summarize(sim.simulate(sim.wan_setting(n, 0.0, 3, 0, V, 30.0), a), skip_first=False)
                for a in ("diloco", "noloco")}
        assert rows["diloco"]["mb_round"] * 1e6 == pytest.approx(2 * (n - 1) / n * V, rel=0.01)
        # its partner(s), and up to max_adopted nodes that chose it from another view
        assert V <= rows["noloco"]["mb_round"] * 1e6 <= (2 + sim.MAX_ADOPTED) * V
        # a slow node whose every choice is already done steps alone now and then
        assert rows["diloco"]["ok"] == 1.0 and rows["noloco"]["ok"] >= 0.9


def test_a_node_whose_view_lacks_a_finished_peer_is_adopted_by_another():
    """Views differ: node 0 is done before the slow ones look, so they draw groups without it.
    Whoever they choose that chose someone else answers with its data (adoption), so every
    node averages with someone and nobody waits for the timeout."""
    s = _setting(4)
    s.compute_s = lambda i, r: (10.0, 10.0, 20.0, 20.0)[i]  # 0 and 1 finish long before 2 and 3
    rec = {x.node: x for x in sim.simulate(s, "noloco")}
    assert all(x.status == "ok" for x in rec.values())
    assert max(x.comm_s for x in rec.values()) < s.exchange_timeout_s
    assert sum(x.bytes_sent for x in rec.values()) >= 4 * V


def test_the_grouped_all_reduce_is_the_all_reduce_within_each_group():
    whole = _setting(8)
    grouped = _setting(8)
    grouped.allreduce_group = 8  # one group of everyone: the same round as DiLoCo's
    a = [(x.node, x.end, x.bytes_sent) for x in sim.simulate(whole, "diloco")]
    b = [(x.node, x.end, x.bytes_sent) for x in sim.simulate(grouped, "grouped")]
    assert a == b
    grouped = _setting(16)
    grouped.allreduce_group = 4
    recs = sim.simulate(grouped, "grouped")
    assert all(x.status == "ok" and x.group == 4 for x in recs)
    # two vectors' worth within a group of four, plus JOIN/DONE or ROSTER/COMMIT
    assert all(abs(x.bytes_sent - 2 * 3 / 4 * V) <= 4 * 4 * sim.CONTROL_BYTES for x in recs)
