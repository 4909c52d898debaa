"""A pipeline's plans when its leader dies: pipeline nodes in one process over real ZeroMQ
sockets, each with a DHT view from a static list (the swarm tests run the real DHT)."""

from __future__ import annotations

import threading
import time

import pytest

from loco.node.config import build_config
from loco.node.pipeline.compute import Activations
from loco.node.pipeline.planning import Planner
from loco.node.pipeline.post import Post
from loco.node.pipeline.standing import Standing
from loco.protocols.membership import PeerInfo, ViewUnknown
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import JOINING, PLAN, REJOINING, STARTING, admit, leader_of
from loco.protocols.transport import Transport
from loco.protocols.wire import Message


class _View:
    """What one node sees of the swarm: every transport in ``alive`` but its own."""

    def __init__(self, transports: dict[str, Transport], stages: dict[str, int], alive: set[str], me: str):
        self.transports, self.stages, self.alive, self.me = transports, stages, alive, me
        self.partial = False  # the lookups miss records (a DHT node stopped answering)
        self.strict_lookups = threading.Semaphore(0)  # released once per strict lookup

    def peers(self, strict: bool = False) -> list[PeerInfo]:
        if strict:
            self.strict_lookups.release()
            if self.partial:
                raise ViewUnknown("the DHT lookup missed records still valid")
        return [PeerInfo(n, t.endpoint, 0, self.stages[n]) for n, t in sorted(self.transports.items())
                if n != self.me and n in self.alive]

    def announce(self, info: PeerInfo) -> None:
        pass


@pytest.fixture
def swarm():
    """Transports for the leader ``a`` (stage 0), ``d`` (stage 0) and ``b`` (stage 1); ``d``
    and ``b`` plan and wait for plans (their Planner, over their own channel)."""
    stages = {"a": 0, "b": 1, "d": 0}
    transports = {n: Transport(n) for n in stages}
    alive = set(stages)
    nodes = {}
    stop = threading.Event()
    for name in ("b", "d"):
        cfg = build_config({"pipeline": {"stages": 2, "stage": stages[name]}, "node": {"id": name},
                            "swarm": {"join_timeout_s": 60}})
        channel = Channel()
        channel.attach(transports[name])
        standing = Standing(name, stages[name], transports[name].endpoint, member=True)
        post = Post(transports[name], channel, name)
        nodes[name] = Planner(cfg, standing, _View(transports, stages, alive, name), channel, post, stop,
                              started=time.time(), val_batches=0, val_loss=lambda: float("nan"),
                              activations=Activations((2, 8, 16)), n_blocks=2)
    yield transports, alive, nodes
    stop.set()  # (a thread still waiting for a plan returns)
    for t in transports.values():
        t.close(flush_s=0.5)


def test_a_plan_the_dying_leader_sent_to_some_nodes_only_reaches_the_rest(swarm):
    transports, alive, nodes = swarm
    b, d = nodes["b"], nodes["d"]
    meta = {"paths": [["a", "b", "a"], ["d", "b", "d"]], "eval": [], "stages": {"a": 0, "b": 1, "d": 0},
            "endpoints": {n: t.endpoint for n, t in transports.items()}, "joins": {}, "last": False}
    # the leader's plan of iteration 0 reaches d; a dies before it is sent to b
    transports["a"].send(transports["d"].endpoint, Message(PLAN, round=0, meta=meta))
    work = d.wait_plan(0)
    assert work is not None and work.paths == meta["paths"]
    got = {}
    waiter = threading.Thread(daemon=True, target=lambda: got.setdefault("work", b.wait_plan(0)))
    waiter.start()
    alive.discard("a")  # (its DHT record expires)
    d.relay_orphaned_plan(d.roster())  # d leads now: the plan goes out again, to those that are alive
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "b still waits for the plan of iteration 0"
    assert got["work"].paths == meta["paths"] and got["work"].number == 0
    # once only; and a copy of a plan already taken is dropped, not kept as a later one
    d.relay_orphaned_plan(d.roster())
    transports["b"].send(transports["d"].endpoint, Message(PLAN, round=0, meta=meta))
    assert d.channel.pull(1, timeout=2.0) is None and d.channel.plans == {}
    assert transports["d"].sent_by_kind.get(PLAN) == 1


def test_the_new_leader_resends_a_missed_plan_before_planning_the_next(swarm):
    transports, alive, nodes = swarm
    b, d = nodes["b"], nodes["d"]
    meta = {"paths": [["a", "b", "a"]], "eval": [], "stages": {"a": 0, "b": 1, "d": 0},
            "endpoints": {n: t.endpoint for n, t in transports.items()}, "joins": {}, "last": False}
    transports["a"].send(transports["d"].endpoint, Message(PLAN, round=0, meta=meta))
    assert d.wait_plan(0) is not None  # (d's part of iteration 0 is done; a dies)
    alive.discard("a")
    d.standing.layer_s = 0.01  # (what d measured of its speed; the plan needs it)
    got = []
    waiter = threading.Thread(daemon=True, target=lambda: got.extend([b.wait_plan(0), b.wait_plan(1)]))
    waiter.start()
    assert d.wait_plan(1) is not None  # d leads iteration 1
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "b still waits for the plan of iteration 0"
    assert got[0].paths == meta["paths"]
    assert all(p[0] == "d" for p in got[1].paths)  # d planned iteration 1; a is on no path


def test_a_plan_goes_to_the_stage0_nodes_first(swarm):
    """(so a leader that dies mid-broadcast has most likely reached its successor)"""
    transports, alive, nodes = swarm
    d = nodes["d"]
    order = []
    send = d.post.send
    d.post.send = lambda node, endpoint, msg: (order.append(node), send(node, endpoint, msg))
    roster = d.roster()
    assert [p.id for p in roster] == ["a", "b", "d"]
    d.post.broadcast(PLAN, 0, {"paths": []}, list(reversed(roster)))
    assert order == ["a", "b"]  # the stage-0 nodes (a; d itself, through its inbox) before b
    assert d.channel.pull(0, timeout=1) is None and d.channel.take_plan(0).sender == "d"


def test_iteration_0_is_planned_with_the_placement_while_records_still_show_the_old_stages(swarm):
    transports, alive, nodes = swarm
    b, d = nodes["b"], nodes["d"]
    alive.discard("a")  # (d leads)
    d.standing.layer_s = 0.01
    d.membership.stages = {**d.membership.stages, "b": 0}  # b's record: the stage it started with
    d.placement = {"a": 0, "b": 1, "d": 0}  # auto_assign put it on stage 1 (its record lags)
    work = d.wait_plan(0)
    assert work is not None and work.stages == {"b": 1, "d": 0}
    assert work.paths and all(p == ["d", "b", "d"] for p in work.paths)
    assert b.wait_plan(0).paths == work.paths  # b, on stage 1, takes part in it
    # the placement is for iteration 0 only: from then on the records tell
    assert {p.id: p.stage for p in d.roster()} == {"b": 0, "d": 0}


def test_a_node_whose_lookups_are_partial_does_not_lead(swarm):
    """A lookup that missed the leader's record would make d lead too: two plans of one
    iteration, and nodes following either send each other tasks of the other one."""
    transports, alive, nodes = swarm
    d = nodes["d"]
    d.standing.layer_s = 0.01
    view = d.membership
    view.partial = True
    alive.discard("a")  # (what a partial lookup shows: no a, so d would be the smallest stage-0 node)
    got = []
    waiter = threading.Thread(daemon=True, target=lambda: got.append(d.wait_plan(0)))
    waiter.start()
    for _ in range(3):  # three passes of its loop, each with a partial lookup
        assert view.strict_lookups.acquire(timeout=30)
    assert transports["d"].sent_by_kind.get(PLAN) is None and not got
    alive.add("a")
    meta = {"paths": [["a", "b", "a"]], "eval": [], "stages": {"a": 0, "b": 1, "d": 0},
            "endpoints": {n: t.endpoint for n, t in transports.items()}, "joins": {}, "last": False}
    transports["a"].send(transports["d"].endpoint, Message(PLAN, round=0, meta=meta))
    waiter.join(timeout=30)
    assert got and got[0].paths == meta["paths"]  # the leader's plan, the only one
    assert transports["d"].sent_by_kind.get(PLAN) is None


def test_a_node_left_out_of_a_plan_it_never_got_joins_again_once_a_later_plan_admits_it(swarm):
    """The leader lost sight of b's record (late refreshes on a busy machine): its plan of
    iteration 1 left b out and went only to the nodes it saw; the plan of 2 admits b again.
    b, waiting for the plan of 1, must take that up: the pipeline puts it on paths from 3."""
    transports, alive, nodes = swarm
    b = nodes["b"]
    meta = {"paths": [["a", "b", "a"]], "eval": [], "stages": {"a": 0, "b": 1, "d": 0},
            "endpoints": {n: t.endpoint for n, t in transports.items()}, "joins": {"b": ""}, "last": False}
    transports["a"].send(transports["b"].endpoint, Message(PLAN, round=2, meta=meta))
    got = []
    waiter = threading.Thread(daemon=True, target=lambda: got.append(b.wait_plan(1)))
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "b still waits for the plan of iteration 1"
    assert got == [None] and not b.standing.member and 2 in b.channel.plans  # (joining takes it up)


def _peer(node: str, stage: int, round: int = 3, endpoint: str | None = None) -> PeerInfo:
    return PeerInfo(node, endpoint or f"tcp://{node}", round, stage)


def test_admission_keeps_the_plans_members_and_admits_the_others_from_a_replica_of_their_stage():
    prev = {"stages": {"a": 0, "b": 1, "c": 1}, "endpoints": {n: f"tcp://{n}" for n in "abc"}, "joins": {}}
    roster = [_peer("a", 0), _peer("b", 1), _peer("c", 1), _peer("e", 1, JOINING), _peer("f", 2, JOINING)]
    members, joins = admit(prev, roster)
    # e joins stage 1 from its smallest replica; f's stage has no member: it brings its own
    assert joins == {"e": "b", "f": ""} and [p.id for p in members] == ["a", "b", "c", "f"]
    # a restart of b (a new endpoint) is a new node: it joins from c
    members, joins = admit(prev, [_peer("a", 0), _peer("b", 1, JOINING, "tcp://b2"), _peer("c", 1)])
    assert joins == {"b": "c"} and [p.id for p in members] == ["a", "c"]
    # a fresh swarm: everyone who is here, nobody joins
    assert admit(None, roster) == (roster, {})
    # a node still starting (timing its passes, probing links) is admitted once it waits for a plan
    members, joins = admit(prev, [*roster[:3], _peer("e", 1, STARTING)])
    assert joins == {} and [p.id for p in members] == ["a", "b", "c"]


def test_a_joiner_whose_source_left_is_admitted_again_from_another_replica():
    # plan k admitted e from b; b died before handing it the state, and e says so
    prev = {"stages": {"a": 0, "c": 1}, "endpoints": {n: f"tcp://{n}" for n in "abce"}, "joins": {"e": "b"}}
    members, joins = admit(prev, [_peer("a", 0), _peer("c", 1), _peer("e", 1, REJOINING)])
    assert joins == {"e": "c"} and [p.id for p in members] == ["a", "c"]
    # while its record still says JOINING (the hand-off under way), it counts as a member
    members, joins = admit(prev, [_peer("a", 0), _peer("c", 1), _peer("e", 1, JOINING)])
    assert joins == {} and [p.id for p in members] == ["a", "c", "e"]
    # and with no replica of its stage left it brings its own state at once
    members, joins = admit(prev, [_peer("a", 0), _peer("e", 1, REJOINING)])
    assert joins == {"e": ""} and [p.id for p in members] == ["a", "e"]
    # once a plan has admitted it again from c, it is receiving c's state: its record may
    # still say REJOINING, but admitting it once more would take it out of the next plan
    again = {**prev, "stages": {"a": 0, "c": 1}, "joins": {"e": "c"}}
    members, joins = admit(again, [_peer("a", 0), _peer("c", 1), _peer("e", 1, REJOINING)])
    assert joins == {} and [p.id for p in members] == ["a", "c", "e"]


def test_the_leader_is_the_smallest_live_stage_0_member_of_the_last_plan():
    prev = {"stages": {"b": 0, "d": 0, "c": 1}, "endpoints": {n: f"tcp://{n}" for n in "bcd"}}
    assert leader_of(prev, [_peer("a", 0), _peer("b", 0), _peer("c", 1), _peer("d", 0)]) == "b"  # a is no member
    assert leader_of(prev, [_peer("b", 0, endpoint="tcp://b2"), _peer("d", 0)]) == "d"  # b restarted
    assert leader_of(prev, [_peer("c", 1)]) is None
    assert leader_of(None, [_peer("c", 0), _peer("a", 1), _peer("b", 0)]) == "b"


def test_the_channel_files_what_comes_by_what_the_loop_waits_for():
    from loco.protocols.pipeline.channel import Channel
    from loco.protocols.pipeline.plan import FINAL, FWD, HANDOFF

    channel = Channel()
    for kind, round in ((PLAN, 3), (PLAN, 3), (FWD, 4), (FWD, 2), (HANDOFF, 5), (FINAL, 9), (FWD, 3)):
        channel.put(Message(kind, round=round, meta={"copy": len(channel.plans)}))
    got = [channel.pull(3, timeout=1) for _ in range(7)]
    # only iteration 3's task comes out; its first plan is kept, the later iteration's task waits
    assert [m.kind for m in got if m is not None] == [FWD] and got[-1].round == 3
    assert list(channel.plans) == [3] and channel.take_plan(3).meta == {"copy": 0}
    assert channel.next_filed(HANDOFF).round == 5 and channel.next_filed(HANDOFF) is None
    assert channel.next_filed(FINAL).round == 9
    channel.taken = 3
    channel.put(Message(PLAN, round=3, meta={}))  # a resent copy of a plan taken already: stale
    assert channel.pull(3, timeout=1) is None and channel.plans == {}
    channel.start(4)  # iteration 4's task, kept, is read again
    assert channel.pull(4, timeout=1).round == 4
    channel.keep_for(6, Message(FWD, round=6, meta={}))
    channel.forget_before(7)
    channel.start(6)
    assert channel.pull(6, timeout=0.1) is None
