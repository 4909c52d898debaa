"""The in-transport network shaper: pure schedule math, then real sockets."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from loco.protocols.collective import CollectiveTimeouts, GroupAllReduce
from loco.protocols.membership import PeerInfo
from loco.protocols.pipeline.probe import LinkProber
from loco.protocols.shaper import Cut, LinkProfile, Shaper
from loco.protocols.transport import Transport
from loco.protocols.wire import Message

from .conftest import wait_until
from .transports import open_transport

MBIT = 1e6


def test_bandwidth_and_latency_schedule():
    s = Shaper(LinkProfile(bandwidth_bps=8 * MBIT, latency_s=0.05))
    assert s.schedule("b", 1_000_000, now=10.0) == pytest.approx(11.05)  # 1 MB at 1 MB/s + 50 ms
    assert s.schedule("b", 1_000_000, now=10.0) == pytest.approx(12.05)  # queued behind the first
    assert s.schedule("c", 1_000_000, now=10.0) == pytest.approx(11.05)  # another link is free


def test_shared_uplink_serializes_all_links():
    s = Shaper(LinkProfile(latency_s=0.0), uplink_bps=8 * MBIT)
    assert s.schedule("b", 500_000, now=0.0) == pytest.approx(0.5)
    assert s.schedule("c", 500_000, now=0.0) == pytest.approx(1.0)


def test_per_peer_profile_overrides_default():
    s = Shaper(LinkProfile(bandwidth_bps=800 * MBIT), per_peer={"slow": LinkProfile(bandwidth_bps=8 * MBIT)})
    assert s.schedule("fast", 1_000_000, now=0.0) == pytest.approx(0.01)
    assert s.schedule("slow", 1_000_000, now=0.0) == pytest.approx(1.0)


def test_jitter_never_reorders_a_link():
    s = Shaper(LinkProfile(latency_s=0.05, jitter_s=0.05), seed=1)
    times = [s.schedule("b", 100, now=i * 0.001) for i in range(200)]
    assert times == sorted(times)
    assert max(t - i * 0.001 for i, t in enumerate(times)) > 0.06  # jitter is really applied


def test_loss_drops_the_configured_share():
    s = Shaper(LinkProfile(loss=0.2), seed=3)
    lost = sum(s.schedule("b", 100, now=0.0) is None for _ in range(5000))
    assert 0.17 < lost / 5000 < 0.23
    assert s.dropped == lost


def test_cut_drops_only_inside_its_window():
    s = Shaper(cuts=[Cut("b", start=100.0, end=200.0)])
    assert s.schedule("b", 10, now=0.0, wall=150.0) is None
    assert s.schedule("c", 10, now=0.0, wall=150.0) is not None
    assert s.schedule("b", 10, now=0.0, wall=250.0) is not None


def test_invalid_profiles_are_rejected():
    with pytest.raises(ValueError, match="loss"):
        LinkProfile(loss=1.5)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkProfile(bandwidth_bps=0)


def test_real_transfer_takes_bytes_over_bandwidth_plus_latency():
    shaper = Shaper(LinkProfile(bandwidth_bps=20 * MBIT, latency_s=0.1))
    a, b = open_transport("a", shaper=shaper), open_transport("b")
    try:
        payload = torch.zeros(625_000)  # 2.5 MB: 1.0 s at 20 Mbit/s
        start = time.monotonic()
        a.send(b.endpoint, Message("BIG", round=0, tensors=[payload]))
        assert b.recv("BIG", 0, timeout_s=30) is not None
        elapsed = time.monotonic() - start
        assert 1.0 <= elapsed < 3.0, elapsed  # N·8/B + L = 1.1 s; generous upper bound on a busy box
        assert a.bytes_sent > 2_500_000
    finally:
        a.close()
        b.close()


def test_bytes_are_counted_when_queued_and_again_when_they_reach_the_socket():
    """Under emulation a message waits in the shaper: ``bytes_queued`` has it at once (what
    a round's traffic is measured with), ``bytes_sent`` once it reaches the socket; a message
    the emulated link loses was sent by the node, so it is queued but never on the socket."""
    a = open_transport("a", shaper=Shaper(LinkProfile(latency_s=0.5)))
    b = open_transport("b")
    try:
        start = time.monotonic()
        a.send(b.endpoint, Message("BIG", round=0, tensors=[torch.zeros(250_000)]))
        queued, sent, held = a.bytes_queued, a.bytes_sent, time.monotonic() - start < 0.5
        assert queued > 1_000_000
        if held:  # read within the latency (a busy machine may stall the test past it)
            assert sent == 0  # still held back by the latency
        assert b.recv("BIG", 0, timeout_s=30) is not None
        # the sender counts after the socket took the frames, which may be just after they arrive
        wait_until(lambda: a.bytes_sent == a.bytes_queued, 30, "the delivered message counted as sent")
        assert a.bytes_sent == a.bytes_queued == b.bytes_recv
        a.shaper.cuts.append(Cut("b", 0, float("inf")))
        a.name_peer(b.endpoint, "b")
        queued = a.bytes_queued
        a.send(b.endpoint, Message("BIG", round=1, tensors=[torch.zeros(1000)]))
        assert a.bytes_queued > queued and a.bytes_sent == queued
    finally:
        a.close()
        b.close()


def test_collective_copes_with_a_lossy_member():
    n = 3
    transports = [Transport("p0"), Transport("p1"),
                  Transport("p2", shaper=Shaper(LinkProfile(loss=0.3), seed=7))]
    state = {"round": 0}
    timeouts = CollectiveTimeouts(matchmaking_s=3, join_s=6, allreduce_s=2, decision_s=2, max_attempts=2)

    def view(me):
        return lambda: [PeerInfo(t.node_id, t.endpoint, state["round"]) for t in transports if t.node_id != me]

    colls = [GroupAllReduce(t, view(t.node_id), timeouts, chunk_bytes=1024) for t in transports]
    try:
        for r in range(4):
            state["round"] = r
            results: dict = {}

            def member(i: int, r: int = r, results: dict = results) -> None:
                results[i] = colls[i].all_reduce(r, [torch.full((2000,), float(i))], 1.0, "h")

            threads = [threading.Thread(target=member, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert len(results) == n, "a member hung past every deadline"
            ok = [res for res in results.values() if res.status == "ok"]
            assert all(res.status in ("ok", "skipped", "resync") for res in results.values())
            assert all(torch.equal(x.tensors[0], ok[0].tensors[0]) for x in ok)  # members agree
            for res in ok:  # the result is the mean over exactly the reported group
                expected = sum(float(m[1:]) for m in res.group) / len(res.group)
                assert torch.equal(res.tensors[0], torch.full((2000,), expected))
    finally:
        for t in transports:
            t.close()


def test_messages_held_by_the_shaper_leave_before_close():
    """A node that sends and exits at once (its last gossip, its last reduce part) must not
    lose what the emulated link was still holding."""
    import torch

    from loco.protocols.wire import Message

    receiver = open_transport("rx")
    sender = open_transport("tx", shaper=Shaper(LinkProfile(latency_s=0.5)))
    try:
        sender.send(receiver.endpoint, Message("LAST", round=1, tensors=[torch.ones(1000)]))
        sender.close()  # returns once the message has left the shaper
        assert receiver.recv("LAST", 1, timeout_s=10) is not None
    finally:
        sender.close()
        receiver.close()


def test_a_link_probe_measures_the_emulated_link_both_ways():
    """Two nodes 100 ms apart each way (and nothing in their default profile). The answer to
    a probe goes back over the answerer's link to the asker, also when the answerer has never
    sent to it before: the measured one-way latency is the link's, not half of it (the
    answerer's default link, 0 ms, carried the answer before)."""
    link = LinkProfile(latency_s=0.1, bandwidth_bps=80e6)
    a = Transport("a", shaper=Shaper(per_peer={"b": link}))
    b = Transport("b", shaper=Shaper(per_peer={"a": link}))
    try:
        LinkProber(b)
        measured = LinkProber(a).measure({"b": b.endpoint}, payload_bytes=64 << 10)
        latency, bandwidth = measured["b"]
        assert latency >= 0.1 * 0.95, measured  # (a busy machine only adds to it)
        assert bandwidth > 0
        # 3 small and 3 large probes, each answered over the link named "a" (b counts an answer
        # once its socket took it, which may be just after a has it)
        assert a.sent_to["b"] == 6
        wait_until(lambda: b.sent_to["a"] == 6, 30, "b's six answers counted on its link to a")
    finally:
        a.close()
        b.close()


def test_a_link_probe_leaves_a_peer_that_does_not_answer_after_one_probe():
    """A peer that leaves a probe unanswered (dead, or not serving yet) is not measured, and
    gets no further probe: each would add its timeout to the node's start."""
    a, b = Transport("a"), Transport("b")  # b serves no probes
    try:
        assert LinkProber(a).measure({"b": b.endpoint}, payload_bytes=1 << 10, timeout_s=0.5) == {}
        assert a.sent_to["b"] == 1
    finally:
        a.close()
        b.close()
