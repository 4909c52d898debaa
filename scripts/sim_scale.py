"""Discrete-event simulation of loco's synchronization protocols at swarm scale: DiLoCo's
group all-reduce (protocols/collective.py, protocols/data_phase.py) and NoLoCo's gossip
(protocols/gossip.py), from 4 to 1,000 peers, with stragglers and failures.

What is simulated, step by step as the real protocols do it (their parameters are read
from the code: CollectiveTimeouts, the announce TTL, the absence check, NoLoCo's group size
and exchange timeout, and ``random_groups`` itself draws the gossip groups):

  all-reduce   each node finishes its local work (compute, publish, evaluation), sends
               JOIN to the leader (the smallest live id); the leader waits for every peer
               in its view (or for a dead one's record to expire and be noticed, or the
               matchmaking deadline) and sends ROSTER; every member sends one part of the
               vector to each other member through its uplink, each owner averages its part
               once all parts came (or their senders are known dead) and sends it to every
               member; members send DONE; the leader sends COMMIT, or RETRY without members
               that died (the data phases run again) up to ``max_attempts``, or the round is
               skipped when the leader itself died.
  gossip       each node draws groups from the roster of live peers (seeded by the round),
               sends its vector to its partners and waits for theirs; a partner that died
               costs the wait until its record expires and is noticed (or the timeout), then
               the node steps alone. Each node draws from its own view when it reaches the
               exchange, leaving out peers already past the round, as the real roster does;
               a node chosen by one it did not choose answers with its data (adopts it, at
               most ``max_adopted``) or declines.

Network model (the same as loco's in-transport shaper): every message is serialized on its
sender's uplink in order (``start = max(now, uplink busy)``, ``bytes·8/bandwidth``) and
arrives one one-way latency later; receivers' downlinks and per-message CPU costs are not
modeled. A node that dies loses whatever had not left its uplink. A dead node's record
vanishes ``ttl − U(0, ttl/3)`` after its death (records are refreshed every ttl/3) and a
waiting peer notices after one to two more absence checks. Failed nodes are replaced by
fresh nodes that fetch the state (one vector over their uplink's speed) after
``restart_s`` and join the next round, so the swarm size stays constant. DHT lookups cost
``dht_s`` before each JOIN/exchange (a constant: the DHT's own traffic is not simulated).

Two uses:

  python scripts/sim_scale.py --validate runs/scale-X        # against real bench_scale runs
  python scripts/sim_scale.py --sweep [--plot docs/img/sim-scale.png]

The sweep also runs a what-if that loco does not have: the all-reduce within random groups
of 16 each round ("grouped", as hivemind's averager forms groups), to show what bounding
the all-reduce's group would buy.

``--validate`` replays each real run's own per-node local work times (from its JSONL
records) and start times through the simulator with the run's network (bandwidth, latency)
and payload, and prints predicted vs measured per-round and communication time.
``--sweep`` runs a WAN setting (heterogeneous uplinks, latencies from random places on the
globe, stragglers) from 4 to 1,000 peers with 0%, 1% and 5% of peers failing per round.
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loco.node.bandwidth import parse_bandwidth  # noqa: E402
from loco.node.config import NoLoCoConfig, SwarmConfig  # noqa: E402
from loco.protocols.collective import CollectiveTimeouts  # noqa: E402
from loco.protocols.gossip import GroupExchange, random_groups  # noqa: E402
from loco.protocols.transport import ABSENCE_CHECK_S  # noqa: E402

CONTROL_BYTES = 400  # JOIN, ROSTER, DONE, COMMIT, a decline: a header and a small meta dict
MAX_ADOPTED = inspect.signature(GroupExchange.__init__).parameters["max_adopted"].default
INF = math.inf


@dataclass
class Setting:
    """One simulated swarm. ``compute_s(slot, round)`` is a node's local work in a round;
    ``latency_s`` is the one-way latency between network slots (a replacement node takes its
    predecessor's slot); ``start_s`` when each slot starts its first round."""

    nodes: int
    rounds: int
    payload_bytes: float  # one node's vector as sent (after its codec): NoLoCo sends 2x the model
    uplink_bps: np.ndarray
    latency_s: np.ndarray
    compute_s: Callable[[int, int], float]
    start_s: np.ndarray | None = None
    failure_rate: float = 0.0  # probability that a node dies in a given round
    deaths: dict[tuple[int, int], float] = field(default_factory=dict)  # (slot, round) -> s after its start
    names: list[str] | None = None  # node ids (leader: the smallest; gossip groups are drawn from them)
    allreduce_group: int = 16  # the "grouped" what-if's group size
    seed: int = 0
    dht_s: float = 0.01  # a membership lookup: 7 ms median with 4 DHT peers on 127.0.0.1
    restart_s: float = 10.0
    ttl_s: float = SwarmConfig.model_fields["announce_ttl_s"].default
    check_s: float = ABSENCE_CHECK_S
    timeouts: CollectiveTimeouts = field(default_factory=CollectiveTimeouts)
    group_size: int = NoLoCoConfig.model_fields["group_size"].default
    exchange_timeout_s: float = NoLoCoConfig.model_fields["exchange_timeout_s"].default


@dataclass
class RoundRecord:
    round: int
    node: int  # id (a replacement gets a new, larger id)
    start: float
    ready: float  # local work done
    end: float
    status: str  # ok | alone | skipped | aborted | died
    bytes_sent: float
    group: int
    attempts: int = 1

    @property
    def comm_s(self) -> float:
        return self.end - self.ready

    @property
    def round_s(self) -> float:
        return self.end - self.start


class Network:
    """Per-slot uplinks (FIFO serialization) and one-way latencies; counts bytes sent."""

    def __init__(self, uplink_bps: np.ndarray, latency_s: np.ndarray):
        self.bw = np.asarray(uplink_bps, dtype=float)
        self.lat = np.asarray(latency_s, dtype=float)
        self.free = np.zeros(len(self.bw))
        self.sent = np.zeros(len(self.bw))

    def send(self, src: int, dsts: np.ndarray, nbytes: float, at: float, dies: float = INF) -> np.ndarray:
        """Arrival time at each of ``dsts`` of ``nbytes`` sent to them in order from ``at``;
        inf for what had not left the uplink when the sender died at ``dies``."""
        dsts = np.asarray(dsts)
        out = np.full(len(dsts), float(at))  # to itself: no wire
        others = dsts != src
        if not others.any():
            return out
        start = max(at, self.free[src])
        finish = start + np.arange(1, others.sum() + 1) * (nbytes * 8 / self.bw[src])
        left = finish <= dies
        self.free[src] = finish[-1]
        self.sent[src] += nbytes * left.sum()
        out[others] = np.where(left, finish + self.lat[src, dsts[others]], INF)
        return out


class Swarm:
    """Who is in the swarm and when each slot starts its next round."""

    def __init__(self, s: Setting):
        self.s = s
        self.rng = np.random.default_rng(s.seed)
        self.net = Network(s.uplink_bps, s.latency_s)
        self.ids = np.arange(s.nodes)
        self.names = list(s.names) if s.names else [f"{i:06d}" for i in range(s.nodes)]
        self.next_id = s.nodes
        self.start = np.zeros(s.nodes) if s.start_s is None else np.asarray(s.start_s, dtype=float).copy()
        self.prev_comm = np.full(s.nodes, 0.1)

    def local(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ready, death, noticed) per slot for round ``r``: local work done, death (inf:
        survives the round; a death falls anywhere in the round), when a waiting peer
        notices it."""
        s, n = self.s, self.s.nodes
        ready = self.start + np.array([s.compute_s(i, r) for i in range(n)])
        death = np.full(n, INF)
        if s.failure_rate:
            dying = self.rng.random(n) < s.failure_rate
            span = ready - self.start + self.prev_comm
            death[dying] = self.start[dying] + self.rng.random(dying.sum()) * span[dying]
        for (slot, when), after in s.deaths.items():
            if when == r:
                death[slot] = self.start[slot] + after
        expiry = death + s.ttl_s - self.rng.uniform(0, s.ttl_s / 3, n)
        noticed = expiry + self.rng.uniform(0, s.check_s, n) + s.check_s
        return ready, death, noticed

    def replace(self, slot: int, died: float) -> float:
        """A fresh node takes ``slot``: when it starts its first round."""
        self.ids[slot] = self.next_id
        self.names[slot] = f"~{self.next_id:06d}"  # after every first-generation name
        self.next_id += 1
        fetch = self.s.payload_bytes * 8 / self.net.bw[slot]
        self.net.free[slot] = 0.0
        return died + self.s.restart_s + fetch


def _data_phases(net: Network, members: np.ndarray, at: np.ndarray, death: np.ndarray, noticed: np.ndarray,
                 part_bytes: float, deadline_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Reduce-scatter then all-gather among ``members`` (slots) starting at ``at``: when
    each member has every averaged part (or gave up on the missing ones), and whether it
    misses any. Member k sends its parts to k+1, k+2, ... (mod m), as loco spreads them."""
    m = len(members)
    if m == 1:
        return at.copy(), np.zeros(1, dtype=bool)
    dest = (np.arange(m)[:, None] + np.arange(1, m)[None, :]) % m
    # reduce-scatter: arrival[i, j] = when i's part for owner j arrives (inf: never)
    arrival = np.full((m, m), -INF)
    for k in range(m):
        arrival[k, dest[k]] = net.send(members[k], members[dest[k]], part_bytes, at[k], death[k])
    give_up = np.minimum(noticed[:, None], at[None, :] + deadline_s)  # owner j stops waiting for sender i
    waited = np.where(np.isinf(arrival) & (arrival > 0), give_up, arrival)
    averaged = np.maximum(at, waited.max(axis=0))  # owner j has its part averaged
    # all-gather: back[j, i] = when owner j's averaged part arrives at i
    back = np.full((m, m), -INF)
    for j in range(m):
        alive = averaged[j] < death[j]
        back[j, dest[j]] = (net.send(members[j], members[dest[j]], part_bytes, averaged[j], death[j]) if alive
                            else INF)
    missing = (np.isinf(back) & (back > 0))
    give_up = np.minimum(noticed[:, None], at[None, :] + deadline_s)  # member i stops waiting for owner j
    done = np.maximum(at, np.where(missing, give_up, back).max(axis=0))
    return done, missing.any(axis=0)


def _allreduce_round(sw: Swarm, r: int) -> list[RoundRecord]:
    """One all-reduce round of the whole swarm (DiLoCo's group all-reduce)."""
    return _allreduce_cohorts(sw, r, [np.arange(sw.s.nodes)])


def _grouped_allreduce_round(sw: Swarm, r: int) -> list[RoundRecord]:
    """What-if: the all-reduce within random groups of ``allreduce_group`` nodes each round
    (drawn like the gossip's groups, as hivemind's averager forms groups), each group run
    by the same protocol; not a loco algorithm (yet)."""
    slot_of = {name: i for i, name in enumerate(sw.names)}
    groups = random_groups(sw.names, r, sw.s.allreduce_group, sw.s.seed)
    return _allreduce_cohorts(sw, r, [np.array(sorted(slot_of[x] for x in g)) for g in groups])


def _allreduce_cohorts(sw: Swarm, r: int, cohorts: list[np.ndarray]) -> list[RoundRecord]:
    s = sw.s
    before = sw.net.sent.copy()
    ready, death, noticed = sw.local(r)
    go = ready + s.dht_s  # the round starts with a membership lookup
    end = np.full(s.nodes, INF)
    status = np.array(["skipped"] * s.nodes, dtype=object)
    group = np.zeros(s.nodes, dtype=int)
    attempts = max(_allreduce_cohort(sw, cohort, ready, go, death, noticed, end, status, group)
                   for cohort in cohorts)
    end = np.where(np.isinf(end), np.where(np.isfinite(death), np.maximum(death, ready), go), end)
    return _finish_round(sw, r, ready, end, death, status, group, before, attempts)


def _allreduce_cohort(sw: Swarm, cohort: np.ndarray, ready: np.ndarray, go: np.ndarray, death: np.ndarray,
                      noticed: np.ndarray, end: np.ndarray, status: np.ndarray, group: np.ndarray) -> int:
    """The protocol among the slots of ``cohort``: fills their ``end``, ``status`` and
    ``group``; returns the attempts it took."""
    s, net, t = sw.s, sw.net, sw.s.timeouts
    attempts = 1
    announced = cohort[death[cohort] > ready[cohort]]
    if not len(announced):
        return attempts
    leader = min(announced, key=lambda i: sw.names[i])
    join_at = np.full(s.nodes, INF)
    for i in announced:
        join_at[i] = net.send(i, np.array([leader]), CONTROL_BYTES, go[i], death[i])[0]
    waits = np.minimum(join_at, noticed)  # a peer that died is waited for until it is noticed
    waits[leader] = go[leader]
    roster_at = min(max(go[leader], waits[cohort].max()), go[leader] + t.matchmaking_s)
    members = np.union1d(cohort[join_at[cohort] <= roster_at], [leader])
    if death[leader] <= roster_at:  # followers hear nothing and skip once they notice
        end[announced] = np.minimum(noticed[leader], go[announced] + t.join_s)
        return attempts
    late = np.setdiff1d(announced, members)  # joined after the deadline: told to wait for the next
    end[late] = net.send(leader, late, CONTROL_BYTES, roster_at)
    at = net.send(leader, members, CONTROL_BYTES, roster_at)
    while True:
        part = s.payload_bytes / len(members)
        done, missing = _data_phases(net, members, at, death[members], noticed[members], part, t.allreduce_s)
        lead = np.flatnonzero(members == leader)[0]
        alive = done < death[members]
        done_at = np.array([net.send(members[k], np.array([leader]), CONTROL_BYTES, done[k], death[members[k]])[0]
                            if alive[k] and k != lead else (done[k] if k == lead else noticed[members[k]])
                            for k in range(len(members))])
        decide = min(max(done_at.max(), done[lead]), done[lead] + t.decision_s)
        if death[leader] <= decide:
            end[members] = np.minimum(noticed[leader], done + t.decision_s + t.allreduce_s)
            return attempts
        responders = members[alive]
        told = net.send(leader, responders, CONTROL_BYTES, decide)
        if not missing[alive].any():
            end[responders] = told
            status[responders] = "ok" if len(responders) > 1 else "alone"
            group[responders] = len(responders)
            return attempts
        if attempts >= t.max_attempts:
            end[responders] = told
            status[responders] = "aborted"
            return attempts
        attempts += 1
        members, at = responders, told


def _gossip_round(sw: Swarm, r: int) -> list[RoundRecord]:
    """One round of gossip, event by event: each node draws its group from its own view when
    it reaches the exchange (peers already past the round are left out, as a real node's
    roster leaves out records showing a later round), so views differ; a node chosen by one
    it did not choose answers with its data and takes it in (at most ``max_adopted``), or
    declines when past that or done with the round."""
    s, net = sw.s, sw.net
    n = s.nodes
    before = net.sent.copy()
    ready, death, noticed = sw.local(r)
    go = ready + s.dht_s  # the roster comes from a membership lookup
    end = np.full(n, INF)
    state = ["computing"] * n
    partners: list[set[int]] = [set() for _ in range(n)]
    answered: list[set[int]] = [set() for _ in range(n)]  # data, decline, or gone
    heard: list[set[int]] = [set() for _ in range(n)]  # data averaged in
    adopted = [0] * n
    filed: list[list[int]] = [[] for _ in range(n)]  # data that came while still computing
    slot_of = {name: i for i, name in enumerate(sw.names)}
    events: list[tuple[float, int, str, int, int]] = []
    order = itertools.count()

    def push(t: float, kind: str, src: int, dst: int) -> None:
        heapq.heappush(events, (t, next(order), kind, src, dst))

    def send_data(src: int, dst: int, t: float) -> None:
        at = net.send(src, np.array([dst]), s.payload_bytes, t, death[src])[0]
        if not math.isinf(at):
            push(at, "data", src, dst)

    def decline(src: int, dst: int, t: float) -> None:
        at = net.send(src, np.array([dst]), CONTROL_BYTES, t, death[src])[0]
        if not math.isinf(at):
            push(at, "decline", src, dst)

    def finish_if_done(i: int, t: float) -> None:
        if state[i] == "exchanging" and partners[i] <= answered[i]:
            state[i], end[i] = "done", t

    def take_in(i: int, src: int, t: float) -> None:
        """``i`` (exchanging) got data from ``src``, which it did not choose."""
        if src in partners[i]:
            return
        if adopted[i] >= MAX_ADOPTED:
            decline(i, src, t)
            return
        adopted[i] += 1
        partners[i].add(src)
        answered[i].add(src)
        heard[i].add(src)
        send_data(i, src, t)

    for i in range(n):
        if death[i] > go[i]:
            push(go[i], "go", i, i)
    while events:
        t, _, kind, src, dst = heapq.heappop(events)
        if death[dst] <= t:
            continue
        if kind == "go":
            view = [j for j in range(n) if j == dst or (state[j] != "done" and noticed[j] > t)]
            group = next(g for g in random_groups([sw.names[j] for j in view], r, s.group_size, s.seed)
                         if sw.names[dst] in g)
            partners[dst] = {slot_of[x] for x in group} - {dst}
            state[dst] = "exchanging"
            for p in sorted(partners[dst]):
                send_data(dst, p, t)
                push(min(noticed[p], t + s.exchange_timeout_s), "giveup", p, dst)
            for q in filed[dst]:
                if q in partners[dst]:
                    answered[dst].add(q)
                    heard[dst].add(q)
                else:
                    take_in(dst, q, t)
            finish_if_done(dst, t)
        elif kind == "data":
            if state[dst] == "computing":
                filed[dst].append(src)
            elif state[dst] == "exchanging" and src in partners[dst]:
                answered[dst].add(src)
                heard[dst].add(src)
                finish_if_done(dst, t)
            elif state[dst] == "exchanging":
                take_in(dst, src, t)
            elif src not in partners[dst]:  # done with the round: an immediate decline
                decline(dst, src, t)
        elif kind in ("decline", "giveup") and state[dst] == "exchanging":
            answered[dst].add(src)
            finish_if_done(dst, t)
    for i in range(n):
        if math.isinf(end[i]):  # nobody answered and nothing to give up on (died mid-round)
            end[i] = max(go[i], min(death[i], go[i] + s.exchange_timeout_s))
    status = np.array(["ok" if heard[i] else "alone" for i in range(n)], dtype=object)
    group = np.array([1 + len(heard[i]) for i in range(n)])
    return _finish_round(sw, r, ready, end, death, status, group, before, 1)


def _finish_round(sw: Swarm, r: int, ready: np.ndarray, end: np.ndarray, death: np.ndarray, status: np.ndarray,
                  group: np.ndarray, before: np.ndarray, attempts: int) -> list[RoundRecord]:
    records = []
    for i in range(sw.s.nodes):
        dead = death[i] <= end[i]
        records.append(RoundRecord(r, int(sw.ids[i]), float(sw.start[i]), float(ready[i]), float(end[i]),
                                   "died" if dead else str(status[i]), float(sw.net.sent[i] - before[i]),
                                   int(group[i]), attempts))
        sw.prev_comm[i] = max(0.1, end[i] - ready[i])
        sw.start[i] = sw.replace(i, death[i]) if dead else end[i]
    return records


def simulate(setting: Setting, algorithm: str) -> list[RoundRecord]:
    """Every node's record of every round. ``algorithm``: diloco (the swarm's all-reduce),
    noloco (gossip) or grouped (the all-reduce within random groups of ``allreduce_group``:
    a what-if)."""
    step = {"diloco": _allreduce_round, "noloco": _gossip_round, "grouped": _grouped_allreduce_round}[algorithm]
    sw = Swarm(setting)
    return [rec for r in range(setting.rounds) for rec in step(sw, r)]


def summarize(records: list[RoundRecord], skip_first: bool = True) -> dict[str, float]:
    """Medians over surviving nodes' rounds (after the first, like bench_scale)."""
    live = [x for x in records if x.status != "died" and (x.round > 0 or not skip_first)]
    rounds = {x.round for x in records}
    synced = [x for x in live if x.status == "ok"]
    return {
        "round_s": statistics.median(x.round_s for x in live),
        "round_p95_s": float(np.percentile([x.round_s for x in live], 95)),
        "comm_s": statistics.median(x.comm_s for x in live),
        "mb_round": statistics.median(x.bytes_sent for x in live) / 1e6,
        "ok": len(synced) / max(1, len(live)),
        "retried": sum(1 for r in rounds if any(x.round == r and x.attempts > 1 for x in records)) / len(rounds),
    }


# ------------------------------------------------------------------ validation
def replay(run: Path, bandwidth_bps: float, latency_s: float) -> tuple[Setting, list[dict], str]:
    """A Setting that replays a real run (one ``loco swarm`` output folder): each node's
    start and per-round local work from its records, the payload from its bytes per round.
    Returns (setting, the run's outer records, algorithm)."""
    by_node = {}
    for f in sorted((run / "metrics").glob("*.jsonl")):
        by_node[f.stem] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    names = sorted(by_node, key=lambda x: (len(x), x))
    n = len(names)
    outer = {k: [x for x in v if x["event"] == "outer"] for k, v in by_node.items()}
    starts = np.array([next(x["time"] for x in by_node[k] if x["event"] == "start") for k in names])
    local = [[x["compute_s"] + x.get("publish_s", 0) + x.get("eval_s", 0) + x.get("hash_wait_s", 0)
              + x.get("checkpoint_s", 0) for x in outer[k]] for k in names]
    rounds = min(len(v) for v in local)
    collective = any("matchmaking_s" in x for x in outer[names[0]])
    # invert what each protocol sends per round: all-reduce 2(n-1)/n vectors, gossip one per partner
    synced = [x for k in names for x in outer[k][1:] if x.get("group_size", 1) > 1]
    payload = statistics.median(x["round_bytes"] / (2 * (n - 1) / n if collective else x["group_size"] - 1)
                                for x in synced)
    setting = Setting(
        nodes=n, rounds=rounds, payload_bytes=payload, uplink_bps=np.full(n, bandwidth_bps),
        latency_s=np.full((n, n), latency_s), compute_s=lambda i, r: local[i][r], start_s=starts - starts.min(),
        names=names,
    )
    return setting, [x for k in names for x in outer[k]], "diloco" if collective else "noloco"


def validate(run: Path, bandwidth_bps: float, latency_s: float) -> dict[str, float]:
    """Predicted vs measured medians (rounds after the first) for one real run."""
    setting, real, algorithm = replay(run, bandwidth_bps, latency_s)
    predicted = summarize(simulate(setting, algorithm))
    steady = [x for x in real if x["round"] > 0]
    by_node: dict[str, list[dict]] = {}
    for x in real:
        by_node.setdefault(x["node"], []).append(x)
    round_s = [b["time"] - a["time"] for v in by_node.values() for a, b in zip(v, v[1:], strict=False)]
    return {"algorithm": algorithm, "nodes": setting.nodes, "real_round_s": statistics.median(round_s),
            "sim_round_s": predicted["round_s"], "real_comm_s": statistics.median(x["comm_s"] for x in steady),
            "sim_comm_s": predicted["comm_s"]}


# ------------------------------------------------------------------------ sweep
def wan_setting(nodes: int, failure_rate: float, rounds: int, seed: int, payload_bytes: float,
                compute_s: float, exchange_timeout_s: float | None = None) -> Setting:
    """Peers at random places on the globe (one-way latency = great-circle distance at 2/3 c
    with 1.5x route stretch, plus 2 ms), uplinks log-uniform in 100 Mbit/s .. 1 Gbit/s,
    compute per round ``compute_s`` times a per-node speed (lognormal, sigma 0.1) and a
    per-round jitter (sigma 0.03)."""
    rng = np.random.default_rng(seed)
    lat, lon = np.arcsin(rng.uniform(-1, 1, nodes)), rng.uniform(-math.pi, math.pi, nodes)
    cos = (np.sin(lat)[:, None] * np.sin(lat)[None, :]
           + np.cos(lat)[:, None] * np.cos(lat)[None, :] * np.cos(lon[:, None] - lon[None, :]))
    km = 6371 * np.arccos(np.clip(cos, -1, 1))
    latency = km / 200_000 * 1.5 + 0.002
    uplink = 10 ** rng.uniform(8, 9, nodes)
    speed = rng.lognormal(0, 0.1, nodes)
    jitter = rng.lognormal(0, 0.03, (nodes, rounds))
    s = Setting(nodes=nodes, rounds=rounds, payload_bytes=payload_bytes, uplink_bps=uplink, latency_s=latency,
                compute_s=lambda i, r: compute_s * speed[i] * jitter[i, r], failure_rate=failure_rate, seed=seed)
    if exchange_timeout_s is not None:
        s.exchange_timeout_s = exchange_timeout_s
    return s


def sweep(sizes: list[int], rates: list[float], rounds: int, model_params: float, compute_s: float,
          seed: int, exchange_timeout_s: float | None = None) -> list[dict]:
    rows = []
    for n in sizes:
        for rate in rates:
            for algorithm in ("diloco", "noloco", "grouped"):
                # int8 with per-block scales: ~1 byte per value; NoLoCo sends [phi, theta - phi]
                payload = model_params * (2 if algorithm == "noloco" else 1)
                setting = wan_setting(n, rate, rounds, seed, payload, compute_s, exchange_timeout_s)
                rows.append({"algorithm": algorithm, "nodes": n, "failures": rate,
                             **summarize(simulate(setting, algorithm))})
                print(_row(rows[-1]), flush=True)
    return rows


def _row(x: dict) -> str:
    return (f"| {x['algorithm']} | {x['nodes']} | {x['failures']:.0%} | {x['round_s']:.1f} | {x['round_p95_s']:.1f} "
            f"| {x['comm_s']:.1f} | {x['mb_round']:.0f} | {x['ok']:.1%} | {x['retried']:.0%} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for algorithm, style in (("diloco", "-"), ("noloco", "--"), ("grouped", ":")):
        for rate, color in zip(sorted({x["failures"] for x in rows}), ("C0", "C1", "C3"), strict=False):
            pts = sorted((x["nodes"], x["comm_s"], x["mb_round"], 100 * x["ok"]) for x in rows
                         if x["algorithm"] == algorithm and x["failures"] == rate)
            label = f"{algorithm}, {rate:.0%} fail/round"
            for k, ax in enumerate(axes, start=1):
                ax.plot([p[0] for p in pts], [p[k] for p in pts], style, color=color, marker="o", label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="peers", ylabel="blocked on sync per round, s (median)")
    axes[1].set(xscale="log", xlabel="peers", ylabel="MB sent per peer per round (median)")
    axes[2].set(xscale="log", xlabel="peers", ylabel="% of surviving node-rounds that averaged")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validate", nargs="*", type=Path, default=[],
                    help="bench_scale output folders (their algorithm-N subfolders are replayed)")
    ap.add_argument("--bandwidth", default="100mbit", help="the validated runs' emulated uplink")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="the validated runs' one-way latency")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sizes", default="4,8,16,32,64,128,256,512,1000")
    ap.add_argument("--failures", default="0,0.01,0.05")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--model-params", type=float, default=100e6, help="sent as int8: ~1 byte per value")
    ap.add_argument("--compute-s", type=float, default=100.0, help="local work per round at speed 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exchange-timeout-s", type=float, help="NoLoCo's (default: loco's own)")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    if args.validate:
        print("| run | algorithm | nodes | real round s | sim round s | error | real comm s | sim comm s | error |")
        print("|---|---|---|---|---|---|---|---|---|")
        for folder in args.validate:
            for run in sorted(p for p in folder.iterdir() if (p / "metrics").is_dir()):
                v = validate(run, parse_bandwidth(args.bandwidth), args.latency_ms / 1000)
                print(f"| {run.name} | {v['algorithm']} | {v['nodes']} | {v['real_round_s']:.2f} | "
                      f"{v['sim_round_s']:.2f} | {v['sim_round_s'] / v['real_round_s'] - 1:+.0%} | "
                      f"{v['real_comm_s']:.2f} | {v['sim_comm_s']:.2f} | {v['sim_comm_s'] / v['real_comm_s'] - 1:+.0%} |",
                      flush=True)
    if args.sweep:
        print("| algorithm | peers | failing/round | round s | p95 round s | blocked s | MB/peer/round | synced | "
              "rounds retried |")
        print("|---|---|---|---|---|---|---|---|---|")
        rows = sweep([int(x) for x in args.sizes.split(",")], [float(x) for x in args.failures.split(",")],
                     args.rounds, args.model_params, args.compute_s, args.seed, args.exchange_timeout_s)
        if args.plot:
            plot(rows, args.plot)


if __name__ == "__main__":
    main()
