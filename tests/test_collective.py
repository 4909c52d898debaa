"""Group all-reduce with several peers in one process over real ZeroMQ sockets.

Membership comes from a static list here (the DHT is exercised by the swarm tests)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loco.protocols.codecs import Compressor
from loco.protocols.collective import JOIN, ROSTER, CollectiveTimeouts, GroupAllReduce, PassOver
from loco.protocols.election import Election, Redirect
from loco.protocols.membership import PeerInfo, ViewUnknown
from loco.protocols.messages import ASK, PART, PAST, MetaError, MetaValidator
from loco.protocols.regions import split_bounds
from loco.protocols.shaper import LinkProfile, Shaper
from loco.protocols.state_sync import Snapshot, StateServer, fetch_state, tensors_hash
from loco.protocols.transport import Transport
from loco.protocols.wire import Message

FAST = CollectiveTimeouts(matchmaking_s=10, join_s=20, allreduce_s=5, decision_s=5, max_attempts=3)


class Peers:
    def __init__(self, n: int, timeouts: CollectiveTimeouts = FAST, round: int = 0, chunk_bytes: int = 4 << 20,
                 codec: str = "none", shapers: dict[int, Shaper] | None = None, **codec_options):
        self.transports = [Transport(f"p{i}", shaper=(shapers or {}).get(i)) for i in range(n)]
        self.round = round
        self.alive = {t.node_id for t in self.transports}
        self.unknown: set[str] = set()  # members whose DHT lookups fail
        self.announced: dict[str, int] = {}  # members whose DHT record shows another round
        self.hidden: dict[str, set[str]] = {}  # member -> peers its DHT view does not show yet
        self.sessions: dict[str, str] = {}  # member -> the session its DHT record shows
        self.collectives = [GroupAllReduce(t, self._view(t.node_id), timeouts, Compressor(codec, **codec_options),
                                           chunk_bytes=chunk_bytes)
                            for t in self.transports]

    def _view(self, me: str):
        def live() -> list[PeerInfo]:
            if me in self.unknown:
                raise ViewUnknown("lookup failed")
            return [PeerInfo(t.node_id, t.endpoint, self.announced.get(t.node_id, self.round),
                             session=self.sessions.get(t.node_id, "")) for t in self.transports
                    if t.node_id != me and t.node_id in self.alive and t.node_id not in self.hidden.get(me, ())]
        return live

    def run(self, inputs, members=None, hashes=None, weights=None, spans=None):
        members = range(len(self.transports)) if members is None else members
        results = {}

        def go(i):
            results[i] = self.collectives[i].all_reduce(
                self.round, inputs[i], weights[i] if weights else 1.0, hashes[i] if hashes else "h",
                span=spans[i] if spans else 1)

        threads = [threading.Thread(target=go, args=(i,)) for i in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a member hung past every deadline"
        return results

    def close(self):
        for t in self.transports:
            t.close()


@pytest.fixture
def peers():
    made = []

    def make(n, **kw):
        p = Peers(n, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _inputs(n, shapes=((5, 3), (7,), (2, 2, 2))):
    torch.manual_seed(0)
    return [[torch.randn(s) for s in shapes] for _ in range(n)]


def _view(*ids: str) -> list[PeerInfo]:
    return [PeerInfo(i, f"tcp://{i}", 0) for i in ids]


def test_election_asks_a_follower_again_while_it_redirects_to_a_leader_known_absent():
    e = Election("p3", _view("p0", "p1", "p2"), patience_until=100.0)
    assert e.leader == "p0"
    assert e.next(None, now=0.0) is False and e.leader == "p1"  # p0: absent
    # p1 still follows p0 (it has not heard): ask it again, after a moment, until patience runs out
    assert e.next(Redirect("p0", "tcp://p0"), now=1.0) is True and e.leader == "p1"
    assert e.next(Redirect("p0", "tcp://p0"), now=2.0) is True and e.leader == "p1"
    assert e.next(Redirect("p0", "tcp://p0"), now=100.0) is False and e.leader == "p2"


def test_election_goes_back_to_the_follower_that_redirected_it_to_an_absent_leader():
    e = Election("p2", _view("p1"), patience_until=100.0)  # this view does not show p0
    assert e.leader == "p1"
    assert e.next(Redirect("p0", "tcp://p0"), now=0.0) is False and (e.leader, e.endpoint) == ("p0", "tcp://p0")
    assert e.next(None, now=0.0) is False and e.leader == "p1"  # absent: back to p1, which will lead
    assert e.next(None, now=0.0) is False and e.leader == "p2"  # p1 absent too: this node leads


def test_election_looks_once_more_at_an_absent_leader_whose_roster_has_the_follower():
    e = Election("p2", _view("p0", "p1"), patience_until=100.0)
    assert e.next(None, now=0.0) is False and e.leader == "p1"  # p0 away a moment: absent
    assert e.next(Redirect("p0", "tcp://p0", grouped=True), now=0.0) is False and e.leader == "p0"
    assert e.next(None, now=0.0) is False and e.leader == "p1"
    # a second vouching redirect for the same leader is not followed again (no loop)
    assert e.next(Redirect("p0", "tcp://p0", grouped=True), now=0.0) is True and e.leader == "p1"


def test_split_bounds_cover_everything():
    assert split_bounds(10, 3) == [0, 4, 7, 10]
    assert split_bounds(2, 4) == [0, 1, 2, 2, 2]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_average_is_exact_and_bit_identical_on_every_member(peers, n):
    p = peers(n)
    inputs = _inputs(n)
    results = p.run(inputs)
    for r in results.values():
        assert r.status == "ok" and r.group == tuple(f"p{i}" for i in range(n))
        parts = [r.timings[k] for k in ("matchmaking_s", "data_s", "commit_s")]
        assert min(parts) >= 0 and sum(parts) == pytest.approx(r.timings["total_s"])  # the parts add up
        assert r.timings["data_s"] > 0
    for k in range(len(inputs[0])):
        expected = torch.stack([inputs[i][k] for i in range(n)]).mean(0)
        for i in range(n):
            torch.testing.assert_close(results[i].tensors[k], expected)
            assert torch.equal(results[i].tensors[k], results[0].tensors[k])


@pytest.mark.parametrize("n, numel, chunk_bytes", [(3, 101, 40), (4, 2, 4), (2, 1000, 4)])
def test_chunked_parts_and_tiny_vectors(peers, n, numel, chunk_bytes):
    p = peers(n, chunk_bytes=chunk_bytes)
    torch.manual_seed(n)
    inputs = [[torch.randn(numel)] for _ in range(n)]
    results = p.run(inputs)
    expected = torch.stack([x[0] for x in inputs]).mean(0)
    for i in range(n):
        assert results[i].status == "ok"
        torch.testing.assert_close(results[i].tensors[0], expected)
        assert torch.equal(results[i].tensors[0], results[0].tensors[0])


@pytest.mark.parametrize("codec,options,tol", [("fp16", {}, 1e-3), ("int8", {"block": 16}, 0.05),
                                               ("int4", {"block": 16}, 0.5), ("topk", {"density": 0.5}, 3.0),
                                               ("powersgd", {"rank": 1}, 5.0)])
def test_compressed_average_is_bit_identical_on_every_member(peers, codec, options, tol):
    """Compression applies to each member's part on the way to its owner and to the
    owner's average on the way back; every member ends with the same bits."""
    n = 3
    p = peers(n, chunk_bytes=64, codec=codec, **options)
    shapes = ((40, 12), (9,), (6, 4, 2))
    inputs = _inputs(n, shapes)
    results = p.run(inputs)
    for k in range(len(shapes)):
        expected = torch.stack([inputs[i][k] for i in range(n)]).mean(0)
        for i in range(n):
            assert results[i].status == "ok"
            assert torch.equal(results[i].tensors[k], results[0].tensors[k])
        assert float((results[0].tensors[k] - expected).abs().max()) <= tol
    assert results[0].timings["encode_s"] > 0 and results[0].timings["decode_s"] > 0


def test_weighted_average(peers):
    p = peers(2)
    inputs = [[torch.zeros(4)], [torch.ones(4)]]
    results = p.run(inputs, weights=[1.0, 3.0])
    assert torch.allclose(results[0].tensors[0], torch.full((4,), 0.75))


def test_peer_that_never_joins_costs_the_matchmaking_timeout_only(peers):
    p = peers(3, timeouts=CollectiveTimeouts(matchmaking_s=1.5, join_s=20, allreduce_s=5, decision_s=5))
    inputs = _inputs(3)
    results = p.run(inputs, members=[0, 1])  # p2 is in the DHT view but never shows up
    assert results[0].status == results[1].status == "ok"
    assert results[0].group == ("p0", "p1")
    assert torch.equal(results[0].tensors[0], (inputs[0][0] + inputs[1][0]) / 2)


def _join_then_die(p: Peers, i: int, leaves_view: bool = False, restarts: bool = False) -> None:
    """Peer ``i`` behaves like a member until it has the roster, then disappears (and, with
    ``leaves_view``, its DHT record expires; with ``restarts``, a new process takes its id
    and record at once)."""
    victim = p.transports[i]
    victim.send(p.transports[0].endpoint, Message(JOIN, round=0, meta={
        "state_hash": "h", "weight": 1.0, "endpoint": victim.endpoint}))
    assert victim.recv(ROSTER, 0, sender="p0", timeout_s=30) is not None
    victim.close()
    if leaves_view:
        p.alive.discard(victim.node_id)
    if restarts:  # (after the roster: the round started with the first session)
        p.sessions[victim.node_id] = "second start"


def test_member_that_dies_mid_round_is_dropped_and_the_round_is_redone(peers):
    p = peers(3)
    inputs = _inputs(3)
    killer = threading.Thread(target=_join_then_die, args=(p, 2))
    killer.start()
    results = p.run(inputs, members=[0, 1])
    killer.join(timeout=30)
    for i in (0, 1):
        assert results[i].status == "ok", results[i].reason
        assert results[i].group == ("p0", "p1")
        assert results[i].attempts == 2
    assert torch.equal(results[0].tensors[1], results[1].tensors[1])
    torch.testing.assert_close(results[0].tensors[1], (inputs[0][1] + inputs[1][1]) / 2)


def _p2_dies_after_the_roster(peers, leaves_view: bool, restarts: bool) -> tuple[list, dict]:
    """p0 and p1 average round 0 with p2, which dies once it has the roster (see
    ``_join_then_die``); the data phase's deadline is 60 s, the checks every 0.2 s."""
    p = peers(3, timeouts=CollectiveTimeouts(matchmaking_s=10, join_s=20, allreduce_s=60, decision_s=60,
                                             max_attempts=3))
    p.sessions = {t.node_id: "first start" for t in p.transports}
    for c in p.collectives:
        c.check_s = 0.2
    inputs = _inputs(3)
    killer = threading.Thread(target=_join_then_die, args=(p, 2, leaves_view, restarts))
    killer.start()
    results = p.run(inputs, members=[0, 1])
    killer.join(timeout=30)
    for i in (0, 1):
        assert results[i].status == "ok" and results[i].group == ("p0", "p1"), results[i].reason
        assert results[i].timings["total_s"] < 30, results[i].timings  # not the 60 s data-phase deadline
    return inputs, results


def test_member_that_dies_mid_round_and_leaves_the_view_is_not_waited_for_until_the_deadline(peers):
    """Its parts never come; once the DHT view no longer shows it, the others stop waiting
    for them and redo the round without it, instead of waiting the whole data phase out."""
    inputs, results = _p2_dies_after_the_roster(peers, leaves_view=True, restarts=False)
    torch.testing.assert_close(results[0].tensors[1], (inputs[0][1] + inputs[1][1]) / 2)


def test_member_that_dies_mid_round_and_restarts_under_its_id_is_not_waited_for_until_the_deadline(peers):
    """Its record never lapses (a new process announces the same id), but it shows another
    session: the process the round waits for is gone, its parts never come."""
    _p2_dies_after_the_roster(peers, leaves_view=False, restarts=True)


def test_member_sending_nan_is_excluded_and_the_rest_agree(peers):
    p = peers(3)
    inputs = _inputs(3)
    inputs[2][0][1, 1] = float("nan")  # a diverged replica
    results = p.run(inputs)
    assert results[2].status == "skipped"
    for i in (0, 1):
        assert results[i].status == "ok" and results[i].group == ("p0", "p1")
        torch.testing.assert_close(results[i].tensors[0], (inputs[0][0] + inputs[1][0]) / 2)


def test_member_with_a_different_state_is_told_to_resync(peers):
    p = peers(3)
    results = p.run(_inputs(3), hashes=["h", "h", "other"])
    assert results[2].status == "resync"
    assert results[0].status == "ok" and results[0].group == ("p0", "p1")


def test_join_after_the_round_closed_is_answered_at_once(peers):
    p = peers(2, timeouts=CollectiveTimeouts(matchmaking_s=0.5, join_s=20, allreduce_s=5, decision_s=5))
    p.alive = {"p0"}  # p1 not visible yet: p0 runs round 0 alone
    solo = p.collectives[0].all_reduce(0, [torch.ones(3)], 1.0, "h")
    assert solo.status == "ok" and solo.group == ("p0",)
    p.alive = {"p0", "p1"}
    late = p.collectives[1].all_reduce(0, [torch.ones(3)], 1.0, "h")
    assert late.status == "resync" and late.reason == "leader says closed"
    assert late.timings["total_s"] < 15  # answered, not timed out (join_s is 20)


def test_leader_that_never_answers_makes_followers_skip(peers):
    p = peers(2, timeouts=CollectiveTimeouts(matchmaking_s=1, join_s=1.0, allreduce_s=1, decision_s=1))
    result = p.collectives[1].all_reduce(0, [torch.ones(3)], 1.0, "h")  # p0 (leader) never runs
    assert result.status == "skipped" and result.reason == "no roster from leader"


def _leaves_after(p: Peers, node: str, delay_s: float) -> threading.Timer:
    """Drop ``node`` from every peer's DHT view after ``delay_s`` (as its record expiring would)."""
    timer = threading.Timer(delay_s, p.alive.discard, args=(node,))
    timer.start()
    return timer


def test_a_leader_that_leaves_the_swarm_is_not_waited_for(peers):
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(2, timeouts=slow)
    _leaves_after(p, "p0", 0.5)  # p0 (the leader) never runs, then leaves the DHT
    result = p.collectives[1].all_reduce(0, [torch.ones(3)], 1.0, "h")
    assert result.status == "skipped" and result.reason == "no roster from leader"
    assert result.timings["total_s"] < 30  # gave up once the DHT dropped it, not at join_s (60)


def test_a_follower_stops_waiting_for_a_leader_that_moved_on_without_it(peers):
    """Across a partition the DHT still shows the leader, but its JOIN never arrives: once the
    leader announces a later round it has closed this one, and no roster is coming."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(2, timeouts=slow)
    timer = threading.Timer(0.5, p.announced.__setitem__, args=("p0", 1))  # p0 never runs, then moves on
    timer.start()
    result = p.collectives[1].all_reduce(0, [torch.ones(3)], 1.0, "h")
    assert result.status == "skipped" and result.reason == "no roster from leader"
    assert result.timings["total_s"] < 30  # gave up once p0 announced round 1, not at join_s (60)


def test_a_leader_stops_waiting_for_a_follower_that_moved_on_and_waits_for_it_next_round(peers):
    """Views that differ elect different leaders: a late joiner leads a round expecting p1,
    which averaged it with another leader. Once p1's record shows a later round it is done
    with this one: the leader stops waiting (the peers expecting it next would be held up
    for the whole matchmaking timeout), and p1 is not passed over the next round."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(2, timeouts=slow)
    timer = threading.Timer(0.5, p.announced.__setitem__, args=("p1", 1))  # p1 never joins, then moves on
    timer.start()
    inputs = _inputs(2)
    result = p.collectives[0].all_reduce(0, inputs[0], 1.0, "h")
    timer.join()
    assert result.status == "skipped" and result.reason == "no peer joined in time", result
    assert result.timings["total_s"] < 30, result.timings  # not the matchmaking timeout (60)
    p.round, p.announced = 1, {}
    late = threading.Timer(0.5, lambda: p.collectives[1].all_reduce(1, inputs[1], 1.0, "h"))
    late.start()  # p1 joins round 1 a little after p0 started leading it
    together = p.collectives[0].all_reduce(1, inputs[0], 1.0, "h")
    late.join()
    assert together.status == "ok" and together.group == ("p0", "p1"), together


def test_a_peer_that_adopted_a_later_state_is_not_elected_nor_waited_for(peers):
    """p0 adopted a peer's state at round 1: it runs no round 0. Asked to lead round 0, it
    answers "absent" and p1 leads instead; told by its SKIP, a leader expecting it stops
    waiting. Either way not after a whole timeout (60 s here)."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow)
    inputs = _inputs(3)
    p.collectives[0].skip_to(1, [])  # no notice sent: p1 and p2 still elect p0 and JOIN it
    results = p.run(inputs, members=[1, 2])
    for i in (1, 2):
        assert results[i].status == "ok" and results[i].group == ("p1", "p2"), results[i]
        assert results[i].timings["total_s"] < 30, results[i].timings
    torch.testing.assert_close(results[1].tensors[0], (inputs[1][0] + inputs[2][0]) / 2)

    q = peers(3, timeouts=slow)
    q.collectives[1].skip_to(1, [q.transports[0].endpoint, q.transports[2].endpoint])  # p0 leads, expecting p1
    results = q.run(inputs, members=[0, 2])
    for i in (0, 2):
        assert results[i].status == "ok" and results[i].group == ("p0", "p2"), results[i]
        assert results[i].timings["total_s"] < 30, results[i].timings


def test_a_node_fetching_a_state_is_not_waited_for_and_leads_again_if_the_fetch_fails(peers):
    """While p0 fetches a peer's state at round 1 (whose snapshot may wait on round 0), a JOIN
    for round 0 gets "absent" and p1 leads it; the fetch failed, so p0 is in round 1 again."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow)
    inputs = _inputs(3)
    p.collectives[0].away(1)
    first = p.run(inputs, members=[1, 2])
    assert all(r.status == "ok" and r.group == ("p1", "p2") for r in first.values()), first
    p.collectives[0].away(0)
    p.round = 1
    second = p.run(inputs)
    assert all(r.status == "ok" and r.group == ("p0", "p1", "p2") for r in second.values()), second


def test_a_leader_that_waits_for_a_node_fetching_a_later_state_is_told_it_is_past_the_round(peers):
    """p2 fetches a peer's state at round 1, whose snapshot waits on round 0, which p0 leads
    expecting p2 (its record shows the round). Asked, p2 answers that it is past round 0:
    p0 and p1 average at once instead of waiting out the matchmaking deadline while p2
    waits for their snapshot (a late Streaming joiner stalled the swarm 30 s this way)."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow)
    inputs = _inputs(3)
    p.collectives[2].away(1)
    results = p.run(inputs, members=[0, 1])
    for i in (0, 1):
        assert results[i].status == "ok" and results[i].group == ("p0", "p1"), results[i]
        assert results[i].timings["total_s"] < 30, results[i].timings


def test_a_node_redirected_to_a_leader_that_is_not_in_the_round_asks_the_redirecting_one_again(peers):
    """p0 adopted a later state and answers "absent", a second late (its link is slow). p1
    follows it meanwhile; p2 (whose view does not show p0) elects p1 and is redirected to p0.
    Told "absent", p2 goes back to p1, which leads by then: one group, not two alone."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow, shapers={0: Shaper(default=LinkProfile(latency_s=1.0))})
    p.hidden = {"p2": {"p0"}}
    p.collectives[0].skip_to(1, [])
    inputs = _inputs(3)
    results = p.run(inputs, members=[1, 2])
    for i in (1, 2):
        assert results[i].status == "ok" and results[i].group == ("p1", "p2"), results[i]
        assert results[i].timings["total_s"] < 30, results[i].timings


def test_a_follower_tells_an_asking_leader_it_is_past_the_round_only_once_in_another_group(peers):
    """p2 follows p0 in round 0 but p0 may still answer "absent" (then p2 elects p1): asked by
    p1 meanwhile, p2 must not say it is past round 0. Once p0's roster has it, it says so."""
    p = peers(3)
    asker, desk = p.transports[1], p.collectives[2].desk
    p2 = p.transports[2].endpoint
    desk.set_following((0, "p0", p.transports[0].endpoint))
    asker.send(p2, Message(ASK, round=0, attempt=0, meta={"endpoint": asker.endpoint}))
    # a JOIN to a follower is redirected; it comes back after any answer to the ASK before it
    asker.send(p2, Message(JOIN, round=0, attempt=0, meta={"endpoint": asker.endpoint, "state_hash": "", "weight": 1.0}))
    redirect = asker.recv(ROSTER, 0, sender="p2", timeout_s=30)
    assert redirect is not None and redirect.meta["status"] == "redirect", redirect
    assert asker.mailbox.drain(PAST, 0) == []
    desk.grouped(0, "p0")
    asker.send(p2, Message(ASK, round=0, attempt=0, meta={"endpoint": asker.endpoint}))
    assert asker.recv(PAST, 0, sender="p2", timeout_s=30) is not None


def test_views_that_elect_different_leaders_still_make_one_group(peers):
    """p2's view does not show p0 yet, so p2 elects p1; p1 sees p0 and follows it; p0 leads
    and waits for both. p1 redirects p2's JOIN to its own leader, and the three average
    together at once (without it: p0 waits for p2, p2 for p1, p1 for p0, until a timeout)."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow)
    p.hidden = {"p2": {"p0"}}
    inputs = _inputs(3)
    results = p.run(inputs)
    for i in range(3):
        assert results[i].status == "ok" and results[i].group == ("p0", "p1", "p2"), results[i]
        assert results[i].timings["total_s"] < 30, results[i].timings
    torch.testing.assert_close(results[2].tensors[0], sum(x[0] for x in inputs) / 3)


def test_a_leader_asks_a_member_it_waits_for_and_stops_once_it_is_past_the_round(peers):
    """p1 averaged sync 0 without p0 (p0's record was not visible yet), and its record still
    shows the round that sync is in (records show rounds, not the syncs inside one: DDP,
    Streaming). p0 leads sync 0 expecting it: asked, p1 answers that it is past it."""
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(2, timeouts=slow)
    inputs = _inputs(2)
    p.alive = {"p1"}
    solo = p.collectives[1].all_reduce(0, inputs[1], 1.0, "h")
    assert solo.status == "ok" and solo.group == ("p1",), solo
    p.alive = {"p0", "p1"}
    late = p.collectives[0].all_reduce(0, inputs[0], 1.0, "h")
    assert late.status == "skipped" and late.reason == "no peer joined in time", late
    assert late.timings["total_s"] < 30, late.timings  # not the matchmaking timeout (60)


def test_a_follower_that_leaves_the_swarm_is_not_waited_for(peers):
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow)
    _leaves_after(p, "p2", 0.5)  # in the view when the round starts, never joins, then leaves
    inputs = _inputs(3)
    results = p.run(inputs, members=[0, 1])
    assert results[0].status == results[1].status == "ok" and results[0].group == ("p0", "p1")
    assert results[0].timings["total_s"] < 30  # not the matchmaking deadline (60)
    assert torch.equal(results[0].tensors[0], (inputs[0][0] + inputs[1][0]) / 2)


def test_a_snapshot_hashes_its_leading_tensors_in_the_same_pass():
    ts = [torch.randn(3), torch.randn(2, 2), torch.arange(4.0)]
    snap = Snapshot(0, ts, {}, prefix=2)  # the daemon's weights lead its state
    assert snap.prefix_digest == tensors_hash(ts[:2]) and snap.digest == tensors_hash(ts)
    assert Snapshot(0, ts, {}).digest == tensors_hash(ts)
    assert Snapshot(0, ts, {}, digest="given").digest == "given"


def test_a_snapshot_of_host_tensors_is_readable_while_its_hash_waits_in_line():
    hasher = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    try:
        hasher.submit(gate.wait, 30)  # the hashing thread is busy with an earlier snapshot
        ts = [torch.randn(5), torch.randn(2, 3)]
        snap = Snapshot(3, ts, {}, prefix=1, hasher=hasher)
        assert snap.tensors is ts  # host tensors need no move: readable at once
        seen: list[str] = []
        snap.when_hashed(seen.append)
        assert seen == []  # not hashed yet
        gate.set()
        assert snap.digest == tensors_hash(ts) and snap.prefix_digest == tensors_hash(ts[:1])
        assert seen == [snap.digest]
    finally:
        gate.set()
        hasher.shutdown(wait=True)


def test_state_server_answers_now_and_later(peers):
    p = peers(2)
    server_t, client_t = p.transports
    server = StateServer(server_t)
    tensors = [torch.randn(10), torch.randn(3, 3)]
    server.publish(4, tensors, {"outer_steps": 4})
    snap = fetch_state(client_t, server_t.endpoint, 0, timeout_s=30)
    assert snap is not None and snap.round == 4 and snap.meta == {"outer_steps": 4}
    assert snap.digest == tensors_hash(tensors)
    assert all(torch.equal(a, b) for a, b in zip(snap.tensors, tensors, strict=True))
    # a request for a future round is parked until that round is published
    serve = server_t._handlers["STATE_REQ"]
    received = threading.Event()

    def serve_and_signal(msg):
        serve(msg)
        received.set()  # the request has been seen (and parked, since round 5 is not out)

    server_t.on("STATE_REQ", serve_and_signal)
    later = {}
    t = threading.Thread(target=lambda: later.update(s=fetch_state(client_t, server_t.endpoint, 5, 30)))
    t.start()
    newer = [torch.zeros(10), torch.ones(3, 3)]
    assert received.wait(30)
    server.publish(5, newer, {"outer_steps": 5})
    t.join(timeout=30)
    assert later["s"] is not None and later["s"].round == 5
    assert torch.equal(later["s"].tensors[1], torch.ones(3, 3))


@pytest.mark.parametrize("poisoner", [0, 2], ids=["leader", "follower"])
@pytest.mark.parametrize("poison", ["x1e6", "const1e3", "nan", "inf"])
def test_a_poisoned_contribution_is_excluded_and_the_others_commit_without_it(peers, poisoner, poison):
    """p0 leads (smallest id). The two honest members average each other only; the poisoner
    is told it was excluded (its weights stay as they were: it resynchronizes next round)."""
    p = peers(3)
    torch.manual_seed(1)
    inputs = [[torch.randn(300) * 0.01, torch.randn(40) * 0.01] for _ in range(3)]
    bad = {"x1e6": lambda t: t * 1e6, "const1e3": lambda t: torch.full_like(t, 1e3),
           "nan": lambda t: t.masked_fill(torch.arange(t.numel()) % 7 == 0, float("nan")),
           "inf": lambda t: t.masked_fill(torch.arange(t.numel()) == 3, float("inf"))}[poison]
    inputs[poisoner] = [bad(t) for t in inputs[poisoner]]
    results = p.run(inputs)
    honest = [i for i in range(3) if i != poisoner]
    for i in honest:
        r = results[i]
        assert r.status == "ok" and r.group == tuple(f"p{j}" for j in honest), (i, r.reason)
        for k in range(2):
            expected = torch.stack([inputs[j][k] for j in honest]).mean(0)
            torch.testing.assert_close(r.tensors[k], expected)
            assert torch.isfinite(r.tensors[k]).all()
    # a follower is told it was excluded; a leader coordinates the retry without itself, then
    # adopts the state of a member that averaged (its own inputs were rejected)
    if poisoner == 0:
        assert results[0].status == "resync" and results[0].leader_endpoint == p.transports[1].endpoint
    else:
        assert results[poisoner].status == "skipped"
    named = results[1 if poisoner == 0 else 0].suspects  # an honest member's view
    assert f"p{poisoner}" in named


def test_one_segment_far_above_the_others_is_not_an_outlier_when_the_whole_contribution_is_not(peers):
    """One step's gradients of a small part of a model differ by over 10x between honest
    replicas now and then (seen: 13x on attention weights, 1.2x on the whole vector). The
    rule judges whole contributions: p2's last segment is 13x the others', its whole vector
    5x: averaged, nobody a suspect (judged per segment, p2 was excluded)."""
    torch.manual_seed(4)
    inputs = [[torch.randn(600) * 0.01] for _ in range(3)]
    inputs[2][0][500:] *= 13
    results = peers(3, chunk_bytes=400).run(inputs)  # segments of 100 values
    expected = torch.stack([x[0] for x in inputs]).mean(0)
    for r in results.values():
        assert r.status == "ok" and r.group == ("p0", "p1", "p2") and not r.suspects, r
        torch.testing.assert_close(r.tensors[0], expected)


@pytest.mark.parametrize("claim", [1e-3, None], ids=["small", "missing"])
def test_a_member_cannot_hide_an_outlier_behind_its_claimed_norm(peers, claim):
    """p2 poisons its contribution and states a norm of its choosing with every part: a small
    one is overruled by what arrives (a segment is never longer than the whole), a missing
    one refuses the part. Either way the honest members average each other only. (A norm
    that is not a finite non-negative number never gets this far: the message schema drops
    it, and its sender is a member whose parts did not come; see test_a_parts_norm_...)"""
    p = peers(3, chunk_bytes=400)
    torch.manual_seed(5)
    inputs = [[torch.randn(600) * 0.01] for _ in range(3)]
    inputs[2] = [inputs[2][0] * 1e6]
    send = p.transports[2].send

    def forging(endpoint, msg):
        if msg.kind == "PART":
            if claim is None:
                msg.meta.pop("norm", None)
            else:
                msg.meta["norm"] = claim
        return send(endpoint, msg)

    p.transports[2].send = forging
    results = p.run(inputs)
    for i in (0, 1):
        assert results[i].status == "ok" and results[i].group == ("p0", "p1"), results[i]
        torch.testing.assert_close(results[i].tensors[0], (inputs[0][0] + inputs[1][0]) / 2)


def test_a_contribution_over_several_periods_is_judged_by_its_span_and_a_claimed_span_has_a_cap(peers):
    """p1's last syncs found no group: its input covers 16 periods and is 14x p0's. Judged as
    one period's it is excluded (and was, at every sync, for good); by its span, it is not.
    A poisoner cannot hide x1e6 behind a huge claimed span."""
    torch.manual_seed(3)
    base = torch.randn(300) * 0.01
    drift = [[base], [base.flip(0) * 14]]
    alone = peers(2).run(drift)
    assert all(r.status != "ok" for r in alone.values()) and "p1" in alone[0].suspects, alone
    together = peers(2).run(drift, spans=[1, 16])
    for r in together.values():
        assert r.status == "ok" and r.group == ("p0", "p1") and not r.suspects, r
        torch.testing.assert_close(r.tensors[0], (drift[0][0] + drift[1][0]) / 2)
    poison = peers(3).run([[base], [base.flip(0)], [base * 1e6]], spans=[1, 1, 10**9])
    assert poison[0].status == "ok" and poison[0].group == ("p0", "p1") and "p2" in poison[0].suspects, poison[0]


def test_a_zero_weight_member_is_averaged_with_weight_zero_and_not_judged(peers):
    p = peers(3)
    torch.manual_seed(2)
    inputs = [[torch.randn(200)] for _ in range(3)]
    inputs[1] = [torch.zeros(200)]  # a replica that just restored its last synchronized state
    results = p.run(inputs, weights=[1.0, 0.0, 1.0])
    expected = (inputs[0][0] + inputs[2][0]) / 2
    for r in results.values():
        assert r.status == "ok" and not r.suspects
        torch.testing.assert_close(r.tensors[0], expected)


def test_an_unknown_view_skips_the_round_instead_of_averaging_alone(peers):
    """A failed DHT lookup says nothing about who is live: no member commits a solo round."""
    quick = CollectiveTimeouts(matchmaking_s=2, join_s=3, allreduce_s=3, decision_s=3)
    p = peers(2, timeouts=quick)
    p.unknown = {"p0", "p1"}
    results = p.run(_inputs(2))
    for r in results.values():
        assert r.status == "skipped" and "membership unknown" in r.reason and r.tensors is None


def test_a_lookup_incomplete_once_is_asked_again_before_the_round_is_given_up(peers):
    """A partial DHT lookup at a round's start (a slow DHT node on a busy machine) is asked
    again; only a view that stays unknown skips the round."""
    p = peers(2)
    views = {i: p.collectives[i].live_peers for i in range(2)}
    failures = {0: 1, 1: 2}  # p0's first lookup fails, p1's first two

    def flaky(i):
        def live():
            if failures[i] > 0:
                failures[i] -= 1
                raise ViewUnknown("the DHT lookup missed records still valid: ['p9']")
            return views[i]()
        return live

    for i in range(2):
        p.collectives[i].live_peers = flaky(i)
    results = p.run(_inputs(2))
    assert all(r.status == "ok" and len(r.group) == 2 for r in results.values()), results
    assert failures == {0: 0, 1: 0}


@pytest.mark.parametrize("peer_round", [5, 0])
def test_a_node_alone_at_its_round_skips_it_while_other_peers_are_alive(peers, peer_round):
    """Alone at its round, with its live peers past it (it fell behind: its caller catches
    up) or before it (it ran ahead of them: it rejoins them): committing the round by itself
    as "ok" would split the swarm's weights."""
    p = peers(2)
    p.collectives[0].live_peers = lambda: [PeerInfo("p1", p.transports[1].endpoint, peer_round)]
    result = p.collectives[0].all_reduce(3, _inputs(1)[0])
    assert result.status == "skipped" and result.tensors is None, result
    p.collectives[0].live_peers = lambda: []  # nobody else at all, and p1 left: alone by right
    p.collectives[0].departed = lambda: [p.transports[1].endpoint]
    assert p.collectives[0].all_reduce(4, _inputs(1)[0]).status == "ok"


def test_members_pass_over_a_leader_that_sent_no_roster(peers):
    """p0 leads by id but does not answer (stopped, or across a partition): after one round
    without a roster, p1 and p2 elect p1 and average together."""
    quick = CollectiveTimeouts(matchmaking_s=2, join_s=2, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=quick)
    inputs = _inputs(3)
    first = p.run(inputs, members=[1, 2])
    assert all(r.status == "skipped" and r.reason == "no roster from leader" for r in first.values())
    p.round = 1
    second = p.run(inputs, members=[1, 2])
    for r in second.values():
        assert r.status == "ok" and r.group == ("p1", "p2") and r.leader == "p1"


def test_a_leader_behind_its_followers_resyncs_at_once_and_then_leads_their_round(peers):
    # DDP and Streaming DiLoCo count reduces in steps: a replica that fell a few steps behind
    # while its peers announce the same round in the DHT. If it is the leader, the others'
    # JOINs for their (later) step wait in its mailbox; it must not wait matchmaking_s for
    # JOINs that will never come, once per step it is behind.
    slow = CollectiveTimeouts(matchmaking_s=60, join_s=60, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=slow)
    inputs = _inputs(3)
    results = {}

    def follow(i):
        results[i] = p.collectives[i].all_reduce(3, inputs[i], 1.0, "h", peer_round=0)

    followers = [threading.Thread(target=follow, args=(i,)) for i in (1, 2)]
    for t in followers:
        t.start()
    behind = p.collectives[0].all_reduce(0, inputs[0], 1.0, "h", peer_round=0)
    assert behind.status == "resync" and behind.leader in ("p1", "p2"), behind
    assert behind.leader_endpoint == p.transports[int(behind.leader[1])].endpoint
    assert behind.timings["total_s"] < 30  # not matchmaking_s (60)
    # having adopted their state, it leads the round they are waiting in
    results[0] = p.collectives[0].all_reduce(3, inputs[0], 1.0, "h", peer_round=0)
    for t in followers:
        t.join(timeout=60)
    assert [results[i].status for i in range(3)] == ["ok"] * 3, results
    assert results[0].group == ("p0", "p1", "p2")


def test_a_state_source_that_does_not_answer_the_probe_costs_the_probe_only():
    """Across a partition the DHT shows a source this node cannot reach: the fetch gives up
    after the small probe request, not after the timeout a large state may need."""
    t = Transport("fetcher")
    try:
        start = time.monotonic()
        assert fetch_state(t, "tcp://127.0.0.1:9", 0, timeout_s=60, probe_s=0.5) is None  # nobody listens
        assert time.monotonic() - start < 30
    finally:
        t.close()


def test_a_leader_stops_waiting_for_a_follower_that_never_joins_until_it_does(peers):
    """p2 is in the DHT view but its JOINs never arrive (across a partition): p0 waits the
    matchmaking timeout once, then averages with p1 at once for a while; the round p2 joins
    again, it is waited for again."""
    quick = CollectiveTimeouts(matchmaking_s=3, join_s=20, allreduce_s=5, decision_s=5)
    p = peers(3, timeouts=quick)
    inputs = _inputs(3)
    first = p.run(inputs, members=[0, 1])
    assert first[0].status == "ok" and first[0].group == ("p0", "p1")
    p.round = 1
    second = p.run(inputs, members=[0, 1])
    assert second[0].status == "ok" and second[0].group == ("p0", "p1")
    assert second[0].timings["total_s"] < first[0].timings["total_s"]  # not the matchmaking timeout again
    p.round = 2
    third = p.run(inputs)  # p2 is back: its JOIN (in time, or late and told "closed") ends the pass-over
    assert third[0].status == "ok" and third[2].status in ("ok", "resync"), third
    p.round = 3
    fourth = p.run(inputs)
    assert all(r.status == "ok" and r.group == ("p0", "p1", "p2") for r in fourth.values()), fourth


def test_a_peer_that_drops_out_of_view_without_leaving_is_not_averaged_without(peers):
    """A lookup that went partial after a long stall can show nobody: a member seen lately
    that did not leave may be alive, so the round is skipped, not committed alone."""
    p = peers(2, timeouts=CollectiveTimeouts(matchmaking_s=1, join_s=2, allreduce_s=5, decision_s=5))
    inputs = _inputs(2)
    first = p.run(inputs)
    assert all(r.status == "ok" and len(r.group) == 2 for r in first.values())
    p.round = 1
    p.alive.discard("p1")  # out of p0's view, no "left" record
    alone = p.collectives[0].all_reduce(1, inputs[0], 1.0, "h")
    assert alone.status == "skipped", alone
    p.collectives[0].departed = lambda: [p.transports[1].endpoint]  # now it left: p0 trains alone
    p.round = 2
    solo = p.collectives[0].all_reduce(2, inputs[0], 1.0, "h")
    assert solo.status == "ok" and solo.group == ("p0",), solo


def test_a_pass_over_doubles_while_silent_and_ends_when_the_peer_is_heard_from():
    heard: dict[str, float] = {}
    skip = PassOver(lambda node: heard.get(node, 0.0))
    skip.silent("x", 10)
    assert [skip.passed_over("x", r) for r in (11, 12, 13)] == [True, True, False]
    skip.silent("x", 13)  # silent again: twice as long
    assert [skip.passed_over("x", r) for r in (17, 18)] == [True, False]
    assert not skip.passed_over("y", 14)
    heard["x"] = time.monotonic() + 1.0  # any message from x after it was found silent
    assert not skip.passed_over("x", 14)


def test_a_peer_expected_again_ends_its_pass_over_and_is_waited_for(peers):
    """p1 was silent in round 0 (a pipeline replica planned before its state came), so p0
    would pass it over next round and close that round before p1's JOIN; told that p1 is
    due again (a plan admitted it), p0 waits for it and both average."""
    quick = CollectiveTimeouts(matchmaking_s=3, join_s=20, allreduce_s=5, decision_s=5)
    p = peers(2, timeouts=quick)
    inputs = _inputs(2)
    first = p.run(inputs, members=[0])
    assert first[0].status == "skipped", first  # p1 is in view: never committed alone
    p.round = 1
    p.collectives[0].expect(["p1"])
    results = {}
    lead = threading.Thread(target=lambda: results.setdefault(0, p.collectives[0].all_reduce(1, inputs[0], 1.0, "h")))
    lead.start()
    time.sleep(1.0)  # p1 comes a second late: a passed-over p1 would find the round closed
    results[1] = p.collectives[1].all_reduce(1, inputs[1], 1.0, "h")
    lead.join(timeout=60)
    assert [results[i].status for i in (0, 1)] == ["ok", "ok"], results
    assert results[0].group == ("p0", "p1")


@pytest.mark.parametrize("norm", ["1", float("nan"), float("inf"), -1.0, True])
def test_a_parts_norm_must_be_a_finite_non_negative_number(norm):
    validator = MetaValidator()
    validator.check(PART, {"part": 0, "offset": 0, "codec": {}, "norm": 2.5})
    with pytest.raises(MetaError, match="PART meta field norm"):
        validator.check(PART, {"part": 0, "offset": 0, "codec": {}, "norm": norm})
