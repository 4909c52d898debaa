"""Leadership and the plans. The leader (the smallest live stage-0 member of the last plan)
reads the roster (stage, compute speed, measured links) from the DHT, admits joiners,
schedules one path per microbatch and sends PLAN(it) to every node; the others wait for it.
If the leader dies, the next stage-0 node by id plans the iteration the others are waiting
for, after sending again the plan the dead leader may have sent to only some of them."""

from __future__ import annotations

import logging
import math
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from loco.protocols.membership import Membership, PeerInfo, ViewUnknown
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import PLAN, Iteration, admit, check_plan, leader_of
from loco.protocols.pipeline.schedule import (
    PipeNode,
    Setting,
    check_path,
    full_pipeline,
    random_paths,
    schedule,
)
from loco.protocols.wire import Message

from ..config import Config
from .compute import Activations
from .post import Post
from .standing import Standing

log = logging.getLogger("loco.node.pipeline")


class Planner:
    def __init__(self, cfg: Config, standing: Standing, membership: Membership, channel: Channel, post: Post,
                 stop: threading.Event, started: float, val_batches: int, val_loss: Callable[[], float],
                 activations: Activations, n_blocks: int):
        """``started``: when the node started (time.time(), for ``train.max_time_s``);
        ``val_batches``: validation microbatches per evaluation; ``val_loss()``: the latest
        validation loss, which the plan carries to every node; ``activations``, ``n_blocks``:
        what travels between stages and the model's blocks (the scheduler's cost model)."""
        self.cfg, self.p, self.standing, self.membership = cfg, cfg.pipeline, standing, membership
        self.channel, self.post, self.stop, self.started = channel, post, stop, started
        self.val_batches, self.val_loss = val_batches, val_loss
        self.activations, self.n_blocks = activations, n_blocks
        self.prev: dict[str, Any] | None = None  # the last plan this node took part in
        self.last_plan: Message | None = None  # ... as it came (who sent it)
        self._relayed: set[int] = set()  # plans this node sent again after their leader died
        self._schedules: dict[tuple, list[list[str]]] = {}
        # pipeline.auto_assign's stages (node id -> stage), which iteration 0 is planned with
        self.placement: dict[str, int] = {}

    # ------------------------------------------------------------- who leads
    def roster(self, strict: bool = False) -> list[PeerInfo]:
        """The live nodes the DHT shows, and this node, by id. ``strict``: ViewUnknown if the
        lookup was partial. Until iteration 0 is planned, a placed node counts on the stage
        the placement gave it: its record may not show it yet (the leader planned a busy
        swarm's iteration 0 with stages records still showed from before the placement)."""
        nodes = [*self.membership.peers(strict=strict), self.standing.peer_info()]
        if self.prev is None and self.placement:
            nodes = [replace(p, stage=self.placement.get(p.id, p.stage)) for p in nodes]
        return sorted(nodes, key=lambda p: p.id)

    def whole_roster(self) -> list[PeerInfo] | None:
        """The roster from a lookup that was not partial, else None. Who leads (and who
        places the nodes) is decided on it only: a node that missed the leader's record
        would lead too, and two plans of one iteration split the swarm (nodes following
        either sent each other tasks of the other's plan)."""
        try:
            return self.roster(strict=True)
        except ViewUnknown:
            return None

    def leader(self, roster: list[PeerInfo] | None = None) -> str | None:
        return leader_of(self.prev, self.roster() if roster is None else roster)

    def fresh_swarm(self) -> bool:
        """No node has got past iteration 0: nobody started before this node."""
        return all(p.round <= 0 for p in self.membership.peers())

    def watch(self) -> list[PeerInfo]:
        """The roster, once the plan a dead leader may have left half-sent went out again."""
        roster = self.roster()
        self.relay_orphaned_plan(roster)
        return roster

    # ------------------------------------------------------------- planning
    def setting(self, roster: list[PeerInfo]) -> Setting:
        """The scheduler's model of ``roster``: speeds relative to the median node, links."""
        layer = {p.id: 1.0 / p.throughput for p in roster if p.throughput > 0}
        ref = statistics.median(layer.values()) if layer else 1.0
        nodes = [PipeNode(p.id, p.stage, ref / layer.get(p.id, ref), self.p.memory) for p in roster]
        lat, bw = {}, {}
        for p in roster:
            for q, (latency, bandwidth) in p.links.items():
                lat[(p.id, q)] = latency
                bw[(p.id, q)] = bandwidth
        return Setting(self.p.stages, nodes, self.p.microbatches, self.p.skip, lat, bw,
                       activation_bytes=self.activations.bytes, layer_s=ref,
                       layers_per_stage=self.n_blocks / self.p.stages, swaps=self.p.swaps)

    def _paths(self, setting: Setting) -> list[list[str]]:
        key = tuple((n.id, n.stage) for n in setting.nodes)
        if key not in self._schedules:
            kind = self.p.paths
            if kind == "scheduled":
                paths = schedule(setting, seed=self.cfg.train.seed)
            elif kind == "round_robin":
                paths = full_pipeline(setting)
            else:
                paths = random_paths(setting, random.Random(self.cfg.train.seed))
            for path in paths:
                problems = check_path(setting, path)
                if problems:
                    raise RuntimeError(f"scheduler returned an invalid path {path}: {problems}")
            self._schedules[key] = paths
        return self._schedules[key]

    def _budget_last(self, it: int) -> bool:
        t = self.cfg.train
        elapsed = time.time() - self.started
        per_iter = elapsed / max(1, it)
        return bool(self.stop.is_set() or (t.rounds and it >= t.rounds - 1)
                    or (t.max_time_s and elapsed + per_iter >= t.max_time_s))

    def send_plan(self, it: int, roster: list[PeerInfo]) -> bool:
        """Plan iteration ``it`` for ``roster`` and send it; False while a stage has no live node."""
        members, joins = admit(self.prev, roster)
        missing = sorted(set(range(self.p.stages)) - {p.stage for p in members})
        if missing:
            log.warning("iteration %d: no live node holds stage(s) %s; waiting", it, missing)
            return False
        paths = self._paths(self.setting(members))
        evals = self.eval_paths(members) if it % self.p.eval_every == 0 else []
        val_loss = self.val_loss()
        meta = {"paths": paths, "eval": evals, "endpoints": {p.id: p.endpoint for p in roster},
                "stages": {p.id: p.stage for p in members}, "joins": joins, "last": self._budget_last(it),
                "val_loss": val_loss if math.isfinite(val_loss) else None}
        self.post.broadcast(PLAN, it, meta, roster)
        return True

    def eval_paths(self, members: list[PeerInfo]) -> list[list[str]]:
        """Validation goes through every stage in order: one replica each (smallest id).
        None while a stage has no live replica (its nodes finished or died first)."""
        replicas = [[p.id for p in members if p.stage == s] for s in range(1, self.p.stages)]
        if not all(replicas):
            return []
        nodes = [self.standing.id] + [min(ids) for ids in replicas]
        return [[*nodes, self.standing.id] for _ in range(self.val_batches)]

    # -------------------------------------------------------------- waiting
    def wait_plan(self, it: int) -> Iteration | None:
        """The plan of iteration ``it``: made here if this node leads, else awaited; a
        leader that died is replaced by the next stage-0 node once the DHT drops it. None:
        stopped, or the plan left this node out (``standing.member`` is then False)."""
        me = self.standing
        planned = warned = False
        no_stage0_since = None
        waiting_since = time.monotonic()
        while not self.stop.is_set():
            msg = self.channel.take_plan(it)
            if msg is not None:
                problem = check_plan(msg.meta)
                if problem is None:
                    self.channel.taken = it
                    if me.id in msg.meta["stages"] and msg.meta["endpoints"][me.id] == me.endpoint:
                        self.prev, self.last_plan = msg.meta, msg
                        return Iteration(me.id, it, msg.meta)
                    log.warning("iteration %d: the plan left this node out (the leader lost sight of it); "
                                "joining again", it)
                    if msg.meta.get("joins", {}).get(me.id):  # it admits this node again: joining takes it up
                        self.channel.plans[it] = msg
                    me.member = False
                    return None
                self.post.reject(msg, problem)
            later = self._admitted_later(it)
            if later is not None:
                log.warning("iteration %d: the plan of %d admits this node again, so the plan of %d left it out "
                            "(the leader lost sight of it) and never came here; joining again", it, later, it)
                me.member = False  # (joining takes the later plan up)
                return None
            roster = self.whole_roster()
            if roster is not None:  # (a partial view says nothing of who leads)
                leader = self.leader(roster)
                if leader == me.id and not planned:
                    self.relay_orphaned_plan(roster)  # (before the next plan: the missed one comes first)
                    planned = self.send_plan(it, roster)
                if leader is None:
                    no_stage0_since = no_stage0_since or time.monotonic()
                    if time.monotonic() - no_stage0_since > self.cfg.swarm.join_timeout_s:
                        raise ConnectionError(f"no stage-0 node alive for {self.cfg.swarm.join_timeout_s:.0f}s")
                else:
                    no_stage0_since = None
            plans = self.channel.plans
            if not warned and plans and min(plans) > it and time.monotonic() - waiting_since > 5.0:
                warned = True  # (a plan lost to a leader that died while sending it)
                log.warning("iteration %d: its plan has not come but that of %d has; waiting for the next "
                            "leader to send it again", it, min(plans))
            early = self.channel.pull(it, timeout=1.0)
            if early is not None:  # work of this iteration that came before its plan
                self.channel.keep_for(it, early)
        return None

    def _admitted_later(self, it: int) -> int | None:
        """A plan after ``it`` that came already and admits this node (names it a joiner, at
        its endpoint): the leader left this node out of the plan of ``it`` (it lost sight of
        its record, so the plan went only to the nodes it saw) and the node would otherwise
        wait for that plan for ever, while the pipeline goes on with it on its paths."""
        me = self.standing
        for number in sorted(n for n in self.channel.plans if n > it):
            meta = self.channel.plans[number].meta
            if check_plan(meta) is None and me.id in meta.get("joins", {}) and meta["endpoints"][me.id] == me.endpoint:
                return number
        return None

    def wait_final_plan(self, final: int, deadline: float) -> Iteration | None:
        """After the last step: the plan of the final validation along full paths (sent by
        the leader, which may be this node: checked each pass, as the leader may die after
        the last plan); None if none came by ``deadline``."""
        planned = False
        while time.monotonic() < deadline and not self.stop.is_set():
            roster = None if planned else self.whole_roster()
            if roster and self.leader(roster) == self.standing.id:
                planned = True
                self.relay_orphaned_plan(roster)
                members, _ = admit(self.prev, roster)
                meta = {"paths": [], "eval": self.eval_paths(members),
                        "endpoints": {p.id: p.endpoint for p in roster}, "stages": {p.id: p.stage for p in members}}
                self.post.broadcast(PLAN, final, meta, roster)
            msg = self.channel.take_plan(final)
            if msg is not None:
                problem = check_plan(msg.meta)
                if problem is not None:
                    self.post.reject(msg, problem)
                    continue
                self.channel.taken = final
                return Iteration(self.standing.id, final, msg.meta)
            self.channel.pull(final, timeout=0.5)
        return None

    def relay_orphaned_plan(self, roster: list[PeerInfo]) -> None:
        """Send the last plan again to every node it names, once, if this node leads now and
        the plan's sender is gone: a leader killed while it sent a plan may have reached only
        some of them, and those it missed would wait for that plan while the rest go on.
        Those that had it drop the copy."""
        plan, me = self.last_plan, self.standing.id
        if plan is None or plan.sender == me or plan.round in self._relayed or self.leader(roster) != me:
            return
        self._relayed.add(plan.round)
        log.info("iteration %d: %s, which planned it, is gone: sending its plan again", plan.round, plan.sender)
        live = {(p.id, p.endpoint) for p in roster}
        for node, endpoint in plan.meta["endpoints"].items():
            if node != me and (node, endpoint) in live:
                self.post.send(node, endpoint, Message(PLAN, round=plan.round, meta=plan.meta))
