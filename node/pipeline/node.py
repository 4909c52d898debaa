"""The pipeline node's lifecycle: setup (records, transport, DHT, data), measuring itself,
the iteration loop (plan, tasks, step, hand-offs, record, checkpoint), the final validation
and an ordered shutdown that closes what setup opened, in reverse."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import FINAL, Iteration
from loco.protocols.pipeline.probe import LinkProber
from loco.protocols.state_sync import tensors_hash
from loco.token import make_token

from ..checkpoint import checkpoint_file
from ..config import Config, ConfigError
from ..data import Sampler, check_corpus, load_corpus, node_seed, validation_batches
from ..devices import resolve_device
from ..runtime import (
    NodeIdentity,
    NodeRecords,
    attempt,
    default_node_id,
    open_membership,
    open_transport,
    write_json_atomic,
)
from .checkpoints import StageCheckpoints
from .compute import StageCompute
from .joining import Joining
from .placement import assign_stage, block_seconds, describe_model, measure_links
from .planning import Planner
from .post import Post
from .replica_sync import SYNC_KINDS, ReplicaSync
from .stage_state import StageState
from .standing import Standing

log = logging.getLogger("loco.node.pipeline")


def node_stage(cfg: Config, node_id: str) -> int:
    """This node's stage: pipeline.stage, else its place in a local swarm (node<i>)."""
    p = cfg.pipeline
    if p.stage is not None:
        return p.stage
    m = re.fullmatch(r"node(\d+)", node_id)
    if m is None:
        raise ConfigError(f"pipeline.stage is not set and node id {node_id!r} is not node<i>: "
                          f"set pipeline.stage for this node")
    i = int(m.group(1))
    if p.assignment:
        if i >= len(p.assignment):
            raise ConfigError(f"pipeline.assignment has {len(p.assignment)} entries; node {node_id} needs one")
        return p.assignment[i]
    return i % p.stages


class PipelineNode:
    def __init__(self, cfg: Config, out: Path, stop: threading.Event | None = None):
        self.cfg, self.p, self.out = cfg, cfg.pipeline, out
        self.stop = stop or threading.Event()
        self.id = cfg.node.id or default_node_id(out)
        self.started = time.time()
        # a member takes part in the iterations' plans; a node that starts into a running
        # swarm (or was left out of a plan) is not one until a plan admits it
        self.standing = Standing(self.id, node_stage(cfg, self.id))
        self.channel = Channel()  # what arrives, sorted by what the loop waits for
        self.val_loss = float("nan")
        self.tokens = 0  # trained by the microbatches this node started
        self._closing = ExitStack()  # what setup opened, closed in reverse order when the node ends

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        self.records = NodeRecords(cfg, self.id, self.out)
        self._closing.callback(self.records.close)
        self.metrics, live = self.records.metrics, self.records.live
        if cfg.swarm.insecure:
            log.warning("swarm %r runs WITHOUT a key: anyone who reaches %s can read the model, change it and "
                        "impersonate peers", cfg.swarm.run_id, cfg.node.listen_host)
        identity = NodeIdentity(self.out, self.id).dir  # the same node key across restarts
        self.transport = open_transport(cfg, self.id, self.started, identity)
        self._closing.callback(attempt, "transport", self.transport.close)
        self.standing.endpoint = self.transport.endpoint
        self.channel.attach(self.transport)
        self.post = Post(self.transport, self.channel, self.id, getattr(torch, cfg.pipeline.wire_dtype))
        self.membership, self.reaper = open_membership(cfg, self.id, self.transport)
        self._closing.callback(attempt, "reaper", self.reaper.close)
        self._closing.callback(attempt, "membership", self._leave)
        if live is not None:
            live.watch(self.transport, lambda: len(self.membership.peers()))
        self.corpus = train, val = load_corpus(cfg.data)
        self.sampler = Sampler(train, cfg.model.block_size, cfg.data.batch_size, node_seed(cfg.train.seed, self.id))
        self.val = validation_batches(val, cfg.model.block_size, cfg.data.batch_size, cfg.data.val_batches,
                                      cfg.train.seed)
        self.device = resolve_device(cfg.node.device)
        self.checkpoints = StageCheckpoints(checkpoint_file(self.out / "checkpoints", self.id), cfg.train,
                                            self.metrics.write)

    def _build_stage(self) -> None:
        """The stage's state, its replicas' sync, its compute and joining (after placement:
        the stage is known)."""
        s = self.standing
        self.state = StageState(self.cfg, s.stage, self.device)
        self.sync = ReplicaSync(self.cfg, self.state, self.transport, self.membership, self.stop, lambda: s.it)
        self.compute = StageCompute(self.cfg, self.state, self.sampler, self.val, self.channel, self.post,
                                    self.stop)
        self.joining = Joining(self.cfg, s, self.state, self.planner, self.membership, self.channel, self.post,
                               self.metrics, self.stop, lambda: self.checkpoints.resume(self.state))

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        try:
            self._setup()
            info = {"id": self.id, "maddrs": self.membership.maddrs, "endpoint": self.transport.endpoint,
                    "pid": os.getpid()}
            if self.cfg.swarm.key:
                info["join"] = make_token(self.cfg.swarm.key, self.membership.maddrs)
            if self.records.live is not None:
                info["metrics"] = self.records.live.url
            write_json_atomic(self.out / "nodes" / f"{self.id}.json", info)
            print(f"loco pipeline node {self.id} (stage {self.standing.stage})", flush=True)
            facts = describe_model(self.cfg)
            check_corpus(*self.corpus, self.cfg.model.block_size, facts.vocab_size, self.cfg.data)
            self.planner = Planner(self.cfg, self.standing, self.membership, self.channel, self.post, self.stop,
                                   self.started, len(self.val), lambda: self.val_loss, facts.activations,
                                   facts.n_blocks)
            # answers the peers' link probes from before it is seen in the DHT: a peer that
            # pinged it while it still timed its passes would otherwise wait out the probe
            prober = LinkProber(self.transport)
            self.membership.start_refresh(self.standing.peer_info)
            sw = self.cfg.swarm
            want = max(sw.wait_for_peers, 1 if sw.initial_peers else 0)
            if want:
                self.membership.wait_for_peers(want, sw.join_timeout_s)
            # timed once the peers it waits for are up: nodes started together on one machine
            # then all time their passes while the others run (the first one timed its own
            # while the others were starting, and read twice as slow as they did)
            self.standing.layer_s = block_seconds(facts, self.device)
            measure_links(facts.activations, prober, self.membership, self.standing)
            if self.p.auto_assign:
                assign_stage(self.cfg, self.standing, self.planner, self.membership, self.channel, self.post,
                             self.stop)
            self._build_stage()
            self._closing.callback(attempt, "final checkpoint", self._final_checkpoint)
            self.membership.announce(self.standing.peer_info())
            self.metrics.write("start", step=0, round=0, val_loss=float("nan"), resumed=False,
                               weights_hash=tensors_hash(self.state.params), endpoint=self.transport.endpoint,
                               algorithm=f"skippipe(skip={self.p.skip}, sync={self.p.sync})", tokens=0,
                               stage=self.standing.stage, layer_s=self.standing.layer_s, links=self.standing.links)
            self._loop()
        finally:
            # in reverse order of setup: the final checkpoint, leaving the DHT, the sockets,
            # the records; each step logged if it fails, the others still run
            self._closing.close()
        return 0

    def _sync_bytes_queued(self) -> int:
        by_kind = self.transport.queued_bytes_by_kind
        return sum(by_kind.get(kind, 0) for kind in SYNC_KINDS)

    def _loop(self) -> None:
        me = self.standing
        while not self.stop.is_set():
            if not me.member and not self.joining.join():
                return
            t0 = time.monotonic()
            bytes0 = self.transport.bytes_queued
            work = self.planner.wait_plan(me.it)
            if work is None:
                continue  # stopped (the loop ends) or left out of the plan (join again)
            if work.val_loss is not None:
                self.val_loss = float(work.val_loss)
            plan_s = time.monotonic() - t0
            compute, waited = self.compute.run(work, self.planner.watch)
            t1 = time.monotonic()
            synced0 = self._sync_bytes_queued()
            status, group, reason = self.sync.step(work)
            # only the sync's own messages: another thread's (a probe's answer, a plan) sent
            # meanwhile is not sync traffic
            sync_bytes = self._sync_bytes_queued() - synced0
            for joiner, source in work.joins.items():
                if source == self.id:
                    self.joining.hand_off(work, joiner)
            sync_s = time.monotonic() - t1
            if work.val_losses:
                self.val_loss = sum(work.val_losses) / len(work.val_losses)
            if work.last:
                self._final_eval(work.number)
            me.it += 1
            # (the last checkpoint: at shutdown; iter_s includes the checkpoint's seconds)
            checkpoint_s = 0.0 if work.last else self.checkpoints.periodic(self.state, me.it)
            self._record(work, status, group, time.monotonic() - t0, compute, plan_s + waited + sync_s,
                         self.transport.bytes_queued - bytes0, sync_bytes, checkpoint_s, reason)
            if me.it == 1:  # past iteration 0 now: a node that starts later joins, not plans
                self.membership.announce(me.peer_info())
            if work.last:
                return
            if self.sync.behind:
                self._step_out(work.number)

    def _step_out(self, it: int) -> None:
        """This replica's weights went apart from its stage's other replicas (it missed a
        message of a direct exchange, or they missed its): it leaves the plans and asks to
        be admitted again, to be handed a replica's state (see node/direct_sync.py)."""
        me = self.standing
        log.warning("iteration %d: stage %d's weights here differ from the other replicas'; joining again to be "
                    "handed their state", it, me.stage)
        me.member, me.rejoining = False, True
        self.membership.announce(me.peer_info())

    def _final_eval(self, it: int) -> None:
        """After the last step: the leader validates along a full path and tells everyone."""
        final = it + 1
        deadline = time.monotonic() + self.p.iteration_timeout_s
        work = self.planner.wait_final_plan(final, deadline)
        if work is not None:
            with torch.no_grad():
                self.compute.run(work, self.planner.watch)
            if work.val_losses:
                self.val_loss = sum(work.val_losses) / len(work.val_losses)
                self.post.broadcast(FINAL, final, {"val_loss": self.val_loss}, self.planner.roster())
                return
        while time.monotonic() < deadline and not self.stop.is_set():  # the leader's result
            while (msg := self.channel.next_filed(FINAL)) is not None:
                if isinstance(msg.meta.get("val_loss"), (int, float)):
                    self.val_loss = float(msg.meta["val_loss"])
                    return
                self.post.reject(msg, "val_loss is not a number")
            self.channel.pull(final, timeout=0.5)

    def _record(self, work: Iteration, status: str, group: int, iter_s: float, compute_s: float,
                comm_s: float, round_bytes: int, sync_bytes: int, checkpoint_s: float, reason: str = "") -> None:
        loss = sum(work.losses) / len(work.losses) if work.losses else float("nan")
        self.tokens += len(work.losses) * self.cfg.data.batch_size * self.cfg.model.block_size
        extra: dict[str, Any] = {}
        mine = [work.paths[m] for m, e in work.owned if not e]
        if mine:  # the paths of the microbatches this node started, as nodes and as stages
            extra["routes"] = mine
            extra["paths"] = [[work.stages.get(n, -1) for n in path] for path in mine]
        t = self.transport
        self.metrics.write(
            "outer", round=work.number, step=work.number + 1, status=status, reason=reason, loss=loss,
            val_loss=self.val_loss, group_size=group, stage=self.standing.stage, visited=sorted(work.visited),
            lost=len([k for k in work.abandoned if not k[1]]), elapsed_s=time.time() - self.started, iter_s=iter_s,
            compute_s=compute_s, comm_s=comm_s, checkpoint_s=checkpoint_s, bytes_sent=t.bytes_sent,
            bytes_recv=t.bytes_recv, round_bytes=round_bytes, sync_bytes=[sync_bytes], tokens=self.tokens,
            weights_hash=tensors_hash(self.state.params), **extra,
        )

    # ------------------------------------------------------------- shutdown
    def _final_checkpoint(self) -> None:
        self.checkpoints.close(self.state, self.standing.it)  # written before "stop" is recorded
        t = self.transport
        self.metrics.write("stop", step=self.standing.it, round=self.standing.it, bytes_sent=t.bytes_sent,
                           bytes_recv=t.bytes_recv, dropped=dict(t.dropped), sent_by_kind=dict(t.sent_by_kind),
                           sent_to=dict(t.sent_to))

    def _leave(self) -> None:
        self.membership.leave()
        self.membership.shutdown()
