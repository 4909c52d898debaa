"""The SkipPipe node (docs/ALGORITHMS.md section 5): one stage of the GPT, microbatches that arrive
along scheduled paths, and the stage's replicas kept in sync.

One iteration, as a node sees it::

    leader   the live stage-0 node with the smallest id: reads the roster (stage, compute
             speed, measured links) from the DHT, schedules one path per microbatch
             (protocols.pipeline.schedule) and sends PLAN(it) = paths + endpoints to all.
    owner    a stage-0 node at the head of a path: draws a batch, embeds it, sends the
             activation to the next node of the path (FWD); at the end of the path it
             computes the loss and sends the gradient back along the reverse path (BWD).
    others   run their blocks on each FWD that arrives (at most ``memory`` microbatches held
             for their backward pass; later ones wait), and on each BWD run the backward
             pass and send the input's gradient one hop back.
    step     once every task of the iteration that this node had is done (or the iteration
             deadline passed: a node on a path died), the stage's replicas average their
             gradients (sync = every_step) or step locally and run a DiLoCo outer step every
             ``sync_every`` iterations (sync = diloco).

There is no barrier between iterations: a node starts iteration it + 1 when it has the plan
and has finished its own part of it. The math is the synchronous pipeline's, because each
node steps only after all of its work of the iteration. Messages of an iteration that a
node has not reached wait in a queue. Paths travel in the plan, so only the leader needs
the schedule; a node that dies disappears from the DHT within ``swarm.announce_ttl_s`` and
from the next plan; microbatches already on its path are given up at the deadline. If the
leader dies, the next stage-0 node by id plans the iteration the others are waiting for.

Who takes part: the members of the last plan that are still alive under the same endpoint.
Any other live node (one started late, or restarted: a new endpoint) joins. The plan of
iteration k names it in ``joins`` with a source, a member replica of its stage, which
sends it the stage state (weights, AdamW moments, outer state) after its step of k; the
joiner takes part from k + 1, bit-identical to the source. A joiner whose stage has no
member (source "") brings its own state and takes part in k at once.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import statistics
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from loco.optim import DiLoCo, NoLoCo
from loco.options import compressor_for
from loco.protocols.collective import CollectiveTimeouts, GroupAllReduce
from loco.protocols.gossip import GroupExchange
from loco.protocols.membership import PeerInfo, ViewUnknown
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import (
    ASSIGN,
    BWD,
    DROP,
    FINAL,
    FWD,
    HANDOFF,
    JOINING,
    PLAN,
    REJOINING,
    Iteration,
    admit,
    check_plan,
    check_task,
    leader_of,
)
from loco.protocols.pipeline.probe import LinkProber
from loco.protocols.pipeline.schedule import (
    PipeNode,
    Setting,
    check_path,
    full_pipeline,
    random_paths,
    schedule,
)
from loco.protocols.state_sync import tensors_hash
from loco.protocols.wire import Message
from loco.token import make_token

from .checkpoint import CheckpointError, checkpoint_file, load_latest
from .checkpoint_writer import Cadence, CheckpointWriter, private_copy
from .config import Config, ConfigError, config_to_dict
from .data import Sampler, check_corpus, load_corpus, node_seed, validation_batches
from .devices import resolve_device
from .metrics import MetricsWriter
from .optstate import adam_step, adam_tensors, load_adam
from .runtime import (
    NodeIdentity,
    attempt,
    default_node_id,
    open_live_metrics,
    open_membership,
    open_record_sinks,
    open_transport,
    write_json_atomic,
)
from .stages import StageModel
from .staging import HostStaging, StagedCommunicator
from .sync import GossipCommunicator, SwarmCommunicator

log = logging.getLogger(__name__)

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
        self.cfg = cfg
        self.p = cfg.pipeline
        self.out = out
        self.stop = stop or threading.Event()
        self.id = cfg.node.id or default_node_id(out)
        self.started = time.time()
        self.it = 0
        self.stage = node_stage(cfg, self.id)
        self.channel = Channel()  # what arrives, sorted by what the loop waits for
        self._unreadable_checkpoint = False  # its file is then never written over
        self._saved_it = -1  # the iteration count of the last checkpoint handed to the writer
        self._writer: CheckpointWriter | None = None  # made at the first checkpoint
        self._cadence = Cadence(cfg.train.checkpoint_every, cfg.train.checkpoint_interval_s)
        # a member takes part in the iterations' plans; a node that starts into a running
        # swarm (or was left out of a plan) is not one until a plan admits it
        self.member = False
        self._rejoining = False  # its hand-off source left before sending: it asks to be admitted again
        self._prev: dict[str, Any] | None = None  # the last plan this node took part in
        self._last_plan: Message | None = None  # ... as it came (who sent it)
        self._relayed: set[int] = set()  # plans this node sent again after their leader died
        self.val_loss = float("nan")
        self.layer_s = 0.0
        self.links: dict[str, list[float]] = {}
        self._schedules: dict[tuple, list[list[str]]] = {}
        self._group: list[PeerInfo] = []
        self._seen_replicas: set[str] = set()  # replicas of this stage the DHT has shown this node
        self.tokens = 0  # trained by the microbatches this node started
        self._closing = ExitStack()  # what setup opened, closed in reverse order when the node ends

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.node.threads:
            torch.set_num_threads(cfg.node.threads)
        write_json_atomic(self.out / "config" / f"{self.id}.json", config_to_dict(cfg, redact=True))
        self.metrics = MetricsWriter(self.out / "metrics" / f"{self.id}.jsonl", self.id)
        live = self.live = open_live_metrics(cfg, self.id, self.metrics)
        self.sinks = open_record_sinks(cfg, self.id, self.out, self.metrics)
        for close in reversed(self.sinks):  # (after the metrics file: its last records reach them)
            self._closing.callback(attempt, "a metrics sink", close)
        if live is not None:
            self._closing.callback(attempt, "live metrics", live.close)
        self._closing.callback(attempt, "metrics", self.metrics.close)
        if cfg.swarm.insecure:
            log.warning("swarm %r runs WITHOUT a key: anyone who reaches %s can read the model, change it and "
                        "impersonate peers", cfg.swarm.run_id, cfg.node.listen_host)
        identity = NodeIdentity(self.out, self.id).dir  # the same node key across restarts
        self.transport = open_transport(cfg, self.id, self.started, identity)
        self._closing.callback(attempt, "transport", self.transport.close)
        self.channel.attach(self.transport)
        self.prober = LinkProber(self.transport)
        self.membership, self.reaper = open_membership(cfg, self.id, self.transport)
        self._closing.callback(attempt, "reaper", self.reaper.close)
        self._closing.callback(attempt, "membership", self._leave)
        if self.live is not None:
            self.live.watch(self.transport, lambda: len(self.membership.peers()))
        train, val = load_corpus(cfg.data)
        check_corpus(train, val, cfg.model.block_size, cfg.model.vocab_size, cfg.data)
        self.sampler = Sampler(train, cfg.model.block_size, cfg.data.batch_size, node_seed(cfg.train.seed, self.id))
        self.val = validation_batches(val, cfg.model.block_size, cfg.data.batch_size, cfg.data.val_batches,
                                      cfg.train.seed)
        self.device = resolve_device(cfg.node.device)

    def _build_model(self) -> None:
        """This stage's blocks (from the shared seed) and their inner AdamW; no outer state."""
        cfg, o = self.cfg, self.cfg.optim
        self.model = StageModel(cfg.model, self.stage, self.p.stages, cfg.train.seed, self.device)
        params = self.model.params
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.inner_lr, betas=o.betas,
        )
        self.outer = None

    def _build_stage(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        self._build_model()
        params = self.model.params
        c = cfg.collective
        # a replica still finishing the iteration (waiting out a dead node's microbatches)
        # must be waited for, or the replicas would step apart
        wait = max(c.matchmaking_timeout_s, self.p.iteration_timeout_s + 10)
        timeouts = CollectiveTimeouts(wait, max(c.join_timeout_s, wait + 10), c.allreduce_timeout_s,
                                      c.decision_timeout_s, c.max_attempts)
        # compression.* applies to what the replicas exchange (not to activations and gradients
        # between stages)
        compressor = compressor_for(cfg.compression, cfg.train.seed)
        self.collective = GroupAllReduce(self.transport, self._stage_peers, timeouts, compressor, stop=self.stop,
                                         max_norm_ratio=cfg.collective.max_norm_ratio)
        # GPU tensors reach the collective through reused pinned host buffers
        self.staging = HostStaging(self.device) if self.device.type == "cuda" else None
        if self.p.sync == "diloco":
            comm = SwarmCommunicator(self.collective, lambda: "")
            if self.device.type == "cuda":
                comm = StagedCommunicator(comm, self.device)
            self.outer = DiLoCo(params, comm, o.outer_lr, o.outer_momentum, o.nesterov)
        elif self.p.sync == "noloco":  # gossip with random replicas of the stage, no all-reduce
            n = o.noloco
            gossip = GroupExchange(self.transport, compressor, stop=self.stop,
                                   live=lambda: [p.id for p in self.membership.peers()])
            comm = GossipCommunicator(gossip, self.id, self._stage_peers, n.group_size, n.exchange_timeout_s,
                                      cfg.train.seed, peer_round=lambda: self.it)
            if self.device.type == "cuda":
                comm = StagedCommunicator(comm, self.device)
            self.outer = NoLoCo(params, comm, n.alpha, n.beta, n.gamma)

    def _stage_peers(self) -> list[PeerInfo]:
        """The replicas this iteration's sync expects, less those that left the DHT since
        (the collective stops waiting for them). A failed lookup says nobody left; nor does
        the absence of a replica the DHT never showed this node (see _expect_replicas)."""
        try:
            live = {(p.id, p.endpoint) for p in self.membership.peers(strict=True)}
        except ViewUnknown:
            return list(self._group)
        return [p for p in self._group if self._may_be_live(p.id, (p.id, p.endpoint) in live)]

    def _expect_replicas(self, work: Iteration) -> None:
        """The stage's replicas this iteration's sync waits for: those in the plan that the
        DHT still shows (their records lag behind iterations shorter than a refresh, so the
        DHT cannot say more), and those it has not shown this node yet: a replica that just
        joined (iteration 0 of a fresh swarm) may be in the leader's view and the plan
        before its record reaches this node, and a replica that averaged alone in the
        meantime would step apart from it for good. A failed lookup removes nobody:
        otherwise each replica would average alone and skip the iteration's sync."""
        planned = [PeerInfo(n, work.endpoints[n], work.number, s) for n, s in work.stages.items()
                   if s == self.stage and n != self.id]
        try:
            live = {p.id for p in self.membership.peers(strict=True)}
        except ViewUnknown:
            live = {p.id for p in planned}
        self._seen_replicas |= {p.id for p in planned} & live
        # a replica back in the plan after iterations out of it (a joiner admitted, perhaps
        # planned once before its hand-off failed) was silent for a reason now gone
        self.collective.expect({p.id for p in planned} - {p.id for p in self._group})
        self._group = [p for p in planned if self._may_be_live(p.id, p.id in live)]

    def _may_be_live(self, replica: str, in_view: bool) -> bool:
        """A replica counts as live if the DHT shows it, or has never shown it to this node."""
        return in_view or replica not in self._seen_replicas

    def _peer_info(self) -> PeerInfo:
        round = self.it if self.member else (REJOINING if self._rejoining else JOINING)
        return PeerInfo(self.id, self.transport.endpoint, round, self.stage,
                        1.0 / self.layer_s if self.layer_s else 0.0, left=False, links=self.links)

    def _activation_shape(self) -> tuple[int, int, int]:
        m = self.cfg.model
        return (self.cfg.data.batch_size, m.block_size, m.n_embd)

    def _activation_bytes(self) -> int:
        m = self.cfg.model
        return self.cfg.data.batch_size * m.block_size * m.n_embd * 4

    def _measure_compute(self) -> None:
        """Seconds of one block's forward pass on one microbatch (what the schedule's model
        calls w), from a few timed forward + backward passes of a block like ours."""
        from .model import Block

        m = self.cfg.model
        block = Block(m.n_embd, m.n_head, 0.0).to(self.device)
        x = torch.randn(self.cfg.data.batch_size, m.block_size, m.n_embd, device=self.device, requires_grad=True)
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            block(x).sum().backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        self.layer_s = statistics.median(times[1:]) / 2.5  # forward + backward (1.5x)

    def _measure_links(self) -> None:
        peers = {p.id: p.endpoint for p in self.membership.peers()}
        t0 = time.monotonic()
        measured = self.prober.measure(peers, self._activation_bytes())
        self.links = {peer: [lat, bw] for peer, (lat, bw) in measured.items()}
        log.info("measured the links to %d of %d peers in %.1fs", len(measured), len(peers), time.monotonic() - t0)
        self.membership.announce(self._peer_info())

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        try:
            self._setup()
            info = {"id": self.id, "maddrs": self.membership.maddrs, "endpoint": self.transport.endpoint,
                    "pid": os.getpid()}
            if self.cfg.swarm.key:
                info["join"] = make_token(self.cfg.swarm.key, self.membership.maddrs)
            if self.live is not None:
                info["metrics"] = self.live.url
            write_json_atomic(self.out / "nodes" / f"{self.id}.json", info)
            print(f"loco pipeline node {self.id} (stage {self.stage})", flush=True)
            self._measure_compute()
            self.membership.start_refresh(self._peer_info)
            sw = self.cfg.swarm
            want = max(sw.wait_for_peers, 1 if sw.initial_peers else 0)
            if want:
                self.membership.wait_for_peers(want, sw.join_timeout_s)
            self._measure_links()
            if self.p.auto_assign:
                self._assign()
            self._build_stage()
            self._closing.callback(attempt, "final checkpoint", self._final_checkpoint)
            self.membership.announce(self._peer_info())
            self.metrics.write("start", step=0, round=0, val_loss=float("nan"), resumed=False,
                               weights_hash=tensors_hash(self.model.params), endpoint=self.transport.endpoint,
                               algorithm=f"skippipe(skip={self.p.skip}, sync={self.p.sync})", tokens=0,
                               stage=self.stage, layer_s=self.layer_s, links=self.links)
            self._loop()
        finally:
            # in reverse order of setup: the final checkpoint, leaving the DHT, the sockets,
            # the records; each step logged if it fails, the others still run
            self._closing.close()
        return 0

    # --------------------------------------------------------- leadership
    def _leader(self, roster: list[PeerInfo] | None = None) -> str | None:
        return leader_of(self._prev, self._roster() if roster is None else roster)

    def _fresh_swarm(self) -> bool:
        """No node has got past iteration 0: nobody started before this node."""
        return all(p.round <= 0 for p in self.membership.peers())

    def _roster(self) -> list[PeerInfo]:
        return sorted([*self.membership.peers(), self._peer_info()], key=lambda p: p.id)

    def _setting(self, roster: list[PeerInfo]) -> Setting:
        m = self.cfg.model
        layer = {p.id: 1.0 / p.throughput for p in roster if p.throughput > 0}
        ref = statistics.median(layer.values()) if layer else 1.0
        nodes = [PipeNode(p.id, p.stage, ref / layer.get(p.id, ref), self.p.memory) for p in roster]
        lat, bw = {}, {}
        for p in roster:
            for q, (latency, bandwidth) in p.links.items():
                lat[(p.id, q)] = latency
                bw[(p.id, q)] = bandwidth
        return Setting(self.p.stages, nodes, self.p.microbatches, self.p.skip, lat, bw,
                       activation_bytes=self._activation_bytes(), layer_s=ref,
                       layers_per_stage=m.n_layer / self.p.stages, swaps=self.p.swaps)

    # -------------------------------------------------------------- joining
    def _join(self) -> bool:
        """Wait for a plan that makes this node a member: iteration 0 of a fresh swarm (this
        node plans it if it leads), or a plan that admits it (``joins``). Returns False if
        stopped; raises ConnectionError if the stage state it was promised never came."""
        self.membership.announce(self._peer_info())  # round -1: not (or no longer) a member
        planned = False
        while not self.stop.is_set():
            if self._prev is None and not planned and self._fresh_swarm():
                roster = self._roster()
                if self._leader(roster) == self.id:
                    planned = self._send_plan(0, roster)
            plans = self.channel.plans
            for number in sorted(plans):
                msg = plans[number]
                problem = check_plan(msg.meta)
                if problem is not None:
                    del plans[number]
                    self._reject(msg, problem)
                    continue
                meta = msg.meta
                if meta["endpoints"].get(self.id) != self.transport.endpoint:
                    del plans[number]  # not for this node (or for its earlier run)
                    continue
                source = meta.get("joins", {}).get(self.id)
                if self.id in meta["stages"]:
                    if number == 0 and self._prev is None:
                        return self._became_member(0, "seed")
                    if source == "":  # no replica of its stage is alive: it brings its own state
                        return self._became_member(number, self._resume_own())
                    if self._rejoining:  # planned before the leader saw that its hand-off failed
                        del plans[number]
                        continue
                    raise ConnectionError(f"plan {number} counts this node as a member, but no plan admitted it "
                                          f"(its hand-off plan was lost); restart it to join again")
                del plans[number]
                if source and self._receive_state(source, number, meta["endpoints"][source]):
                    self._prev = meta
                    return self._became_member(number + 1, f"replica {source}")
            self.channel.pull(-1, timeout=1.0)
        return False

    def _became_member(self, it: int, source: str) -> bool:
        self.it, self.member, self._rejoining = it, True, False
        self.channel.forget_before(it)
        self.membership.announce(self._peer_info())
        self.metrics.write("join", round=it, stage=self.stage, source=source,
                           weights_hash=tensors_hash(self.model.params))
        log.info("member from iteration %d (stage %d state: %s)", it, self.stage, source)
        return True

    def _receive_state(self, source: str, number: int, endpoint: str) -> bool:
        """The stage state ``source`` sends after its step of iteration ``number``. False:
        ``source`` left the swarm before sending it; this node then asks to be admitted
        again (its record says REJOINING), and the leader names another replica of its
        stage, or none (it then brings its own checkpoint)."""
        deadline = time.monotonic() + self.cfg.swarm.join_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            while (msg := self.channel.next_filed(HANDOFF)) is not None:
                if msg.sender != source or msg.round != number:
                    log.info("ignored stage state of iteration %d from %s (waiting for %s's of %d)",
                             msg.round, msg.sender, source, number)
                    continue
                problem = self._adopt(msg.tensors, msg.meta)
                if problem is None:
                    return True
                self._reject(msg, problem)
            if not any(p.id == source and p.endpoint == endpoint for p in self.membership.peers()):
                log.warning("%s, which was to send stage %d's state after iteration %d, left the swarm; asking "
                            "to join again", source, self.stage, number)
                self._rejoining = True
                self.membership.announce(self._peer_info())
                return False
            self.channel.pull(-1, timeout=1.0)
        if not self.stop.is_set():
            raise ConnectionError(f"no stage {self.stage} state from {source} within "
                                  f"swarm.join_timeout_s={self.cfg.swarm.join_timeout_s:.0f}s")

    def _state_tensors(self) -> list[torch.Tensor]:
        """What a replica of this stage hands a joining one: weights, AdamW moments and
        (sync = diloco) the outer state."""
        params = self.model.params
        tensors = [p.detach() for p in params] + adam_tensors(self.opt, params)
        return tensors + (self.outer.synchronized_tensors() if self.outer is not None else [])

    def _stage_state(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """A host copy of :meth:`_state_tensors` (training goes on while it is sent)."""
        meta = {"stage": self.stage, "adam_step": adam_step(self.opt, self.model.params),
                "outer_steps": self.outer.outer_steps if self.outer is not None else 0}
        return [t.detach().to("cpu", copy=True) for t in self._state_tensors()], meta

    def _adopt(self, tensors: list[torch.Tensor], meta: dict[str, Any]) -> str | None:
        """Load a stage state; what is wrong with it (None: loaded). A bad one changes nothing."""
        mine = self._state_tensors()
        if meta.get("stage") != self.stage:
            return f"state of stage {meta.get('stage')!r}, this node holds stage {self.stage}"
        steps = (meta.get("adam_step"), meta.get("outer_steps"))
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in steps):
            return f"adam_step/outer_steps are not counts: {steps}"
        if len(tensors) != len(mine) or any(t.dtype != m.dtype or t.shape != m.shape for t, m in zip(tensors, mine, strict=True)):
            return f"{len(tensors)} tensors that do not match this stage's {len(mine)}"
        params = self.model.params
        n = len(params)
        with torch.no_grad():
            for p, t in zip(params, tensors[:n], strict=True):
                p.copy_(t)
        load_adam(self.opt, params, tensors[n:3 * n], meta["adam_step"])
        if self.outer is not None:
            self.outer.load_synchronized(tensors[3 * n:], meta["outer_steps"], reset_params=False)
        return None

    def _hand_off(self, work: Iteration, joiner: str) -> None:
        """Send a joining replica this stage's state after iteration ``work``'s step."""
        tensors, meta = self._stage_state()
        self._send_to(joiner, work.endpoints[joiner], Message(HANDOFF, round=work.number, meta=meta, tensors=tensors))
        log.info("iteration %d: sent stage %d's state to %s, which joins", work.number, self.stage, joiner)

    def _resume_own(self) -> str:
        """A joining node whose stage has no live replica: its own final checkpoint if it
        holds this stage, else the seed's weights. Returns which."""
        path = self.ckpt_path
        try:
            state, _ = load_latest(path)
        except (OSError, CheckpointError) as exc:
            log.warning("%s; stage %d starts from the seed, and this node will not write over that file", exc,
                        self.stage)
            self._unreadable_checkpoint = True
            return "seed"
        saved = (state or {}).get("stage_state")
        if saved is None or state["pipeline"] != {"stage": self.stage, "stages": self.p.stages}:
            log.warning("no replica of stage %d alive and no checkpoint of it: it starts from the seed", self.stage)
            return "seed"
        problem = self._adopt(saved["tensors"], saved["meta"])
        if problem is not None:
            log.warning("checkpoint %s does not fit (%s); stage %d starts from the seed", path, problem, self.stage)
            return "seed"
        return f"checkpoint {path.name}"

    def _plan_paths(self, setting: Setting) -> list[list[str]]:
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

    def _send_plan(self, it: int, roster: list[PeerInfo]) -> bool:
        members, joins = admit(self._prev, roster)
        missing = sorted(set(range(self.p.stages)) - {p.stage for p in members})
        if missing:
            log.warning("iteration %d: no live node holds stage(s) %s; waiting", it, missing)
            return False
        setting = self._setting(members)
        paths = self._plan_paths(setting)
        last = self._budget_last(it)
        evals: list[list[str]] = []
        if it % self.p.eval_every == 0:
            evals = self._eval_paths(members)
        meta = {"paths": paths, "eval": evals, "endpoints": {p.id: p.endpoint for p in roster},
                "stages": {p.id: p.stage for p in members}, "joins": joins, "last": last,
                "val_loss": self.val_loss if math.isfinite(self.val_loss) else None}
        self._broadcast(PLAN, it, meta, roster)
        return True

    def _eval_paths(self, roster: list[PeerInfo]) -> list[list[str]]:
        """Validation goes through every stage in order: one replica each (smallest id).
        None while a stage has no live replica (its nodes finished or died first)."""
        replicas = [[p.id for p in roster if p.stage == s] for s in range(1, self.p.stages)]
        if not all(replicas):
            return []
        nodes = [self.id] + [min(ids) for ids in replicas]
        return [[*nodes, self.id] for _ in self.val]

    def _broadcast(self, kind: str, it: int, meta: dict[str, Any], roster: list[PeerInfo]) -> None:
        """Send to every node of ``roster``: stage-0 nodes first, in id order. A leader that
        dies mid-broadcast has then most likely reached the node that leads after it, which
        sends the plan on (``_relay_orphaned_plan``); one that missed it would plan that
        iteration anew while others ran the dead leader's plan."""
        for p in sorted(roster, key=lambda p: (p.stage != 0, p.id)):
            msg = Message(kind, round=it, meta=meta)
            if p.id == self.id:
                msg.sender = self.id
                self.channel.put(msg)
            else:
                self._send_to(p.id, p.endpoint, msg)

    def _wait_plan(self, it: int) -> Iteration | None:
        """The plan of iteration ``it``: made here if this node leads, else awaited; a
        leader that died is replaced by the next stage-0 node once the DHT drops it. None:
        stopped, or the plan left this node out (``member`` is then False)."""
        planned = warned = False
        no_stage0_since = None
        waiting_since = time.monotonic()
        while not self.stop.is_set():
            msg = self.channel.take_plan(it)
            if msg is not None:
                problem = check_plan(msg.meta)
                if problem is None:
                    self.channel.taken = it
                    if self.id in msg.meta["stages"] and msg.meta["endpoints"][self.id] == self.transport.endpoint:
                        self._prev, self._last_plan = msg.meta, msg
                        return Iteration(self.id, it, msg.meta)
                    log.warning("iteration %d: the plan left this node out (the leader lost sight of it); "
                                "joining again", it)
                    if msg.meta.get("joins", {}).get(self.id):  # it admits this node again: joining takes it up
                        self.channel.plans[it] = msg
                    self.member = False
                    return None
                self._reject(msg, problem)
            roster = self._roster()
            leader = self._leader(roster)
            if leader == self.id and not planned:
                self._relay_orphaned_plan(roster)  # (before the next plan: the missed one comes first)
                planned = self._send_plan(it, roster)
            plans = self.channel.plans
            if not warned and plans and min(plans) > it and time.monotonic() - waiting_since > 5.0:
                warned = True  # (a plan lost to a leader that died while sending it)
                log.warning("iteration %d: its plan has not come but that of %d has; waiting for the next "
                            "leader to send it again", it, min(plans))
            if leader is None:
                no_stage0_since = no_stage0_since or time.monotonic()
                if time.monotonic() - no_stage0_since > self.cfg.swarm.join_timeout_s:
                    raise ConnectionError(f"no stage-0 node alive for {self.cfg.swarm.join_timeout_s:.0f}s")
            else:
                no_stage0_since = None
            early = self.channel.pull(it, timeout=1.0)
            if early is not None:  # work of this iteration that came before its plan
                self.channel.keep_for(it, early)
        return None

    # ---------------------------------------------------------- messages
    def _reject(self, msg: Message, problem: str) -> None:
        """A malformed message is dropped and counted; it never takes the node down."""
        self.transport.dropped[f"Bad{msg.kind}"] += 1
        log.warning("dropped %s of iteration %d from %s: %s", msg.kind, msg.round, msg.sender, problem)

    def _send(self, work: Iteration, node: str, kind: str, m: int, hop: int, is_eval: bool,
              tensor: torch.Tensor) -> None:
        meta = {"mb": m, "hop": hop, "eval": is_eval}
        msg = Message(kind, round=work.number, meta=meta, tensors=[tensor.detach().to("cpu").contiguous()])
        self._send_to(node, work.endpoints[node], msg)

    def _send_to(self, node: str, endpoint: str, msg: Message) -> None:
        self.transport.name_peer(endpoint, node)  # (per-link shaping and counts go by name)
        self.transport.send(endpoint, msg)

    # ------------------------------------------------------------ compute
    def _launch(self, work: Iteration, m: int, is_eval: bool) -> None:
        path = work.path(m, is_eval)
        if is_eval:
            x, y = self.val[m]
            with torch.no_grad():
                h = self.model.embed(x.to(self.device))
        else:
            x, y = self.sampler.next_batch()
            h = self.model.embed(x.to(self.device))
            work.stash[(m, 0)] = (None, h)
        work.targets[(m, is_eval)] = y.to(self.device)
        self._send(work, path[1], FWD, m, 1, is_eval, h)

    def _forward(self, work: Iteration, msg: Message) -> None:
        m, k, is_eval = int(msg.meta["mb"]), int(msg.meta["hop"]), bool(msg.meta["eval"])
        if (m, is_eval) in work.abandoned:
            return
        path = work.path(m, is_eval)
        h_in = msg.tensors[0].to(self.device)
        if k == len(path) - 1:  # back home: the loss, and at once its backward pass
            y = work.targets.pop((m, is_eval))
            if is_eval:
                with torch.no_grad():
                    work.val_losses.append(float(self.model.loss(h_in, y)))
            else:
                h = h_in.requires_grad_()
                loss = self.model.loss(h, y)
                loss.backward()
                work.losses.append(float(loss.detach()))
                self._send(work, path[k - 1], BWD, m, k - 1, False, h.grad)
        elif is_eval:
            with torch.no_grad():
                out = self.model.blocks(h_in)
            self._send(work, path[k + 1], FWD, m, k + 1, True, out)
        else:
            x = h_in.requires_grad_()
            y = self.model.blocks(x)
            work.stash[(m, k)] = (x, y)
            self._send(work, path[k + 1], FWD, m, k + 1, False, y)
        work.done_one(m, is_eval)

    def _backward(self, work: Iteration, msg: Message) -> None:
        m, k = int(msg.meta["mb"]), int(msg.meta["hop"])
        entry = work.stash.pop((m, k), None)
        if entry is None:
            if (m, False) not in work.abandoned:
                log.warning("iteration %d: backward for microbatch %d hop %d that this node does not hold",
                            work.number, m, k)
            return
        x, y = entry
        y.backward(msg.tensors[0].to(self.device))
        if k > 0:
            self._send(work, work.path(m, False)[k - 1], BWD, m, k - 1, False, x.grad)
        work.visited.append(m)
        work.done_one(m, False)

    def _memory_free(self, work: Iteration) -> bool:
        return len(work.stash) < self.p.memory

    def _abandon(self, work: Iteration, m: int, is_eval: bool, why: str, notify: bool = True) -> None:
        """Give a microbatch up here and, unless they told us, on the rest of its path: every
        node that waits for it stops waiting at once (a node that timed out a microbatch
        while the others still wait for it would otherwise leave them out of step)."""
        if (m, is_eval) in work.abandoned:
            return
        others = work.abandon(m, is_eval)
        log.warning("iteration %d: microbatch %d%s given up: %s", work.number, m, " (eval)" if is_eval else "", why)
        if notify:
            for node in others:
                msg = Message(DROP, round=work.number, meta={"mb": m, "eval": is_eval, "why": why})
                self._send_to(node, work.endpoints[node], msg)

    def _relay_orphaned_plan(self, roster: list[PeerInfo]) -> None:
        """Send the last plan again to every node it names, once, if this node leads now and
        the plan's sender is gone: a leader killed while it sent a plan may have reached only
        some of them, and those it missed would wait for that plan while the rest go on.
        Those that had it drop the copy."""
        plan = self._last_plan
        if plan is None or plan.sender == self.id or plan.round in self._relayed or self._leader(roster) != self.id:
            return
        self._relayed.add(plan.round)
        log.info("iteration %d: %s, which planned it, is gone: sending its plan again", plan.round, plan.sender)
        live = {(p.id, p.endpoint) for p in roster}
        for node, endpoint in plan.meta["endpoints"].items():
            if node != self.id and (node, endpoint) in live:
                self._send_to(node, endpoint, Message(PLAN, round=plan.round, meta=plan.meta))

    def _check_paths_alive(self, work: Iteration, roster: list[PeerInfo]) -> None:
        # by endpoint too: a node restarted under the same id is not the one on the path
        live = {(p.id, p.endpoint) for p in roster}
        for (m, is_eval), path in work.pending_paths().items():
            dead = [n for n in path if (n, work.endpoints[n]) not in live]
            if dead:
                self._abandon(work, m, is_eval, f"{', '.join(dead)} left the swarm")

    def _run_tasks(self, work: Iteration) -> tuple[float, float]:
        """Do this node's part of the iteration; returns (compute s, waiting s)."""
        self.model.train()
        self.channel.start(work.number)
        deadline = time.monotonic() + self.p.iteration_timeout_s
        next_check = time.monotonic() + 1.0
        compute = waited = 0.0
        while work.todo > 0 and not self.stop.is_set():
            t0 = time.monotonic()
            while work.launch and (work.launch[0][1] or self._memory_free(work)):
                m, is_eval = work.launch.pop(0)
                self._launch(work, m, is_eval)
            while work.deferred and self._memory_free(work):
                self._forward(work, work.deferred.pop(0))
            compute += time.monotonic() - t0
            if work.todo <= 0:
                break
            now = time.monotonic()
            if now >= deadline:
                for m, is_eval in list(work.remaining):
                    self._abandon(work, m, is_eval, f"not done {self.p.iteration_timeout_s:.0f}s into the iteration")
                break
            if now >= next_check:  # the DHT has no change notification: poll it while waiting
                roster = self._roster()  # (one read for both checks)
                self._relay_orphaned_plan(roster)
                self._check_paths_alive(work, roster)
                next_check = now + 1.0
                continue
            msg = self.channel.pull(work.number, timeout=min(deadline, next_check) - now)
            waited += time.monotonic() - now
            if msg is None:
                continue
            problem = check_task(work, msg, self._activation_shape())
            if problem is not None:
                self._reject(msg, problem)
                continue
            t2 = time.monotonic()
            if msg.kind == DROP:
                self._abandon(work, int(msg.meta["mb"]), bool(msg.meta["eval"]),
                              f"{msg.sender}: {msg.meta.get('why', '?')}", notify=False)
            elif msg.kind == BWD:
                self._backward(work, msg)
            elif msg.kind == FWD:
                m, is_eval = int(msg.meta["mb"]), bool(msg.meta["eval"])
                stays = not is_eval and int(msg.meta["hop"]) < len(work.path(m, False)) - 1
                if stays and not self._memory_free(work):
                    work.deferred.append(msg)
                else:
                    self._forward(work, msg)
            compute += time.monotonic() - t2
        work.stash.clear()  # graphs of microbatches given up
        return compute, waited

    # --------------------------------------------------------------- step
    def _lr(self, it: int) -> float:
        o = self.cfg.optim
        return o.inner_lr * min(1.0, (it + 1) / o.warmup_steps) if o.warmup_steps else o.inner_lr

    def _step(self, work: Iteration) -> tuple[str, int, str]:
        """Average or apply the iteration's gradients; returns (status, replicas in sync, why
        the sync did not happen: "" when it did)."""
        params = self.model.params
        self._expect_replicas(work)
        count = float(len(work.visited))
        for p in params:  # the gradient over this replica's microbatches, as a mean
            if p.grad is not None and count > 0:
                p.grad.div_(count)
        ran = count > 0  # whether there is a gradient to apply
        group = 1
        status, reason = "ok", ""
        if self.p.sync == "every_step":
            # Each replica offers its mean gradient weighted by its microbatch count: the
            # group's weighted average is then the mean over all the group's microbatches,
            # and the outlier rule compares like with like (a replica that ran eight
            # microbatches is not "8x larger" than one that ran one, so not poison). The last
            # element is 1 where a replica ran any microbatch: its average is 0 only when none did.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = [*grads, torch.tensor([float(ran)], dtype=torch.float32, device=self.device)]
            slot = 0
            if self.staging is not None:
                slot, flat = self.staging.to_host(flat)
            result = self.collective.all_reduce(work.number, flat, count, tensors_hash(params))
            if result.status != "ok":
                status, ran = "skipped", False  # apply nothing rather than step apart from the others
                reason = f"{result.status}: {result.reason}"
            else:
                group = len(result.group)
                means = result.tensors if self.staging is None else self.staging.to_device(slot, result.tensors)
                ran = float(means[-1]) > 0
                for p, g in zip(params, means[:-1], strict=True):
                    p.grad = g.to(p.dtype).view_as(p)
        if ran:
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            for g in self.opt.param_groups:
                g["lr"] = self._lr(work.number)
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.outer is not None and (work.number + 1) % self.p.sync_every == 0:
            result = self.outer.outer_step(work.number)
            group = result.group_size
            status = "ok" if result.applied else "skipped"
        return status, group, reason

    # --------------------------------------------------------------- loop
    def _loop(self) -> None:
        while not self.stop.is_set():
            if not self.member and not self._join():
                return
            t0 = time.monotonic()
            bytes0 = self.transport.bytes_queued
            work = self._wait_plan(self.it)
            if work is None:
                continue  # stopped (the loop ends) or left out of the plan (join again)
            if work.val_loss is not None:
                self.val_loss = float(work.val_loss)
            plan_s = time.monotonic() - t0
            compute, waited = self._run_tasks(work)
            t1 = time.monotonic()
            synced0 = self.transport.bytes_queued
            status, group, reason = self._step(work)
            sync_bytes = self.transport.bytes_queued - synced0
            for joiner, source in work.joins.items():
                if source == self.id:
                    self._hand_off(work, joiner)
            sync_s = time.monotonic() - t1
            if work.val_losses:
                self.val_loss = sum(work.val_losses) / len(work.val_losses)
            if work.last:
                self._final_eval(work.number)
            self.it += 1
            checkpoint_s = 0.0 if work.last else self._periodic_checkpoint()  # (the last: at shutdown)
            self._record(work, status, group, time.monotonic() - t0, compute, plan_s + waited + sync_s,  # (iter_s
                         self.transport.bytes_queued - bytes0, sync_bytes, checkpoint_s, reason)  # includes the
            # checkpoint's seconds)
            if self.it == 1:  # past iteration 0 now: a node that starts later joins, not plans
                self.membership.announce(self._peer_info())
            if work.last:
                return

    def _final_eval(self, it: int) -> None:
        """After the last step: the leader validates along a full path and tells everyone."""
        final = it + 1
        planned = False
        deadline = time.monotonic() + self.p.iteration_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            # (checked each pass: the leader may die after the last plan and this node lead)
            roster = [] if planned else self._roster()
            if roster and self._leader(roster) == self.id:
                planned = True
                self._relay_orphaned_plan(roster)
                members, _ = admit(self._prev, roster)
                meta = {"paths": [], "eval": self._eval_paths(members),
                        "endpoints": {p.id: p.endpoint for p in roster}, "stages": {p.id: p.stage for p in members}}
                self._broadcast(PLAN, final, meta, roster)
            msg = self.channel.take_plan(final)
            if msg is not None:
                problem = check_plan(msg.meta)
                if problem is not None:
                    self._reject(msg, problem)
                    continue
                self.channel.taken = final
                work = Iteration(self.id, final, msg.meta)
                with torch.no_grad():
                    self._run_tasks(work)
                if work.val_losses:
                    self.val_loss = sum(work.val_losses) / len(work.val_losses)
                    roster = self._roster()
                    self._broadcast(FINAL, final, {"val_loss": self.val_loss}, roster)
                    return
                break
            self.channel.pull(final, timeout=0.5)
        while time.monotonic() < deadline and not self.stop.is_set():  # the leader's result
            while (msg := self.channel.next_filed(FINAL)) is not None:
                if isinstance(msg.meta.get("val_loss"), (int, float)):
                    self.val_loss = float(msg.meta["val_loss"])
                    return
                self._reject(msg, "val_loss is not a number")
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
        self.metrics.write(
            "outer", round=work.number, step=work.number + 1, status=status, reason=reason, loss=loss,
            val_loss=self.val_loss,
            group_size=group, stage=self.stage, visited=sorted(work.visited), lost=len([k for k in work.abandoned if not k[1]]),
            elapsed_s=time.time() - self.started, iter_s=iter_s, compute_s=compute_s, comm_s=comm_s,
            checkpoint_s=checkpoint_s,
            bytes_sent=self.transport.bytes_sent, bytes_recv=self.transport.bytes_recv, round_bytes=round_bytes,
            sync_bytes=[sync_bytes],
            tokens=self.tokens,
            weights_hash=tensors_hash(self.model.params), **extra,
        )

    # ---------------------------------------------------------- placement
    def _assign(self) -> None:
        """pipeline.auto_assign: the smallest id places every node on a stage from the
        measured speeds and links (keeping each stage's replica count) and tells the rest."""
        from loco.protocols.pipeline.schedule import assign_stages

        if not self._fresh_swarm():  # too late for the placement: fill the thinnest stage
            have = Counter(p.stage for p in self.membership.peers() if p.round >= 0)
            self.stage = min(range(self.p.stages), key=lambda s: (have[s], s))
            log.info("joining a running pipeline: stage %d has the fewest live replicas", self.stage)
            return
        deadline = time.monotonic() + self.cfg.swarm.join_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            roster = self._roster()
            measured = all(p.links and p.throughput > 0 for p in roster)
            if measured and min(p.id for p in roster) == self.id:
                placed = assign_stages(self._setting(roster), seed=self.cfg.train.seed)
                meta = {"stages": {n.id: n.stage for n in placed.nodes}}
                self._broadcast(ASSIGN, 0, meta, roster)
            while (msg := self.channel.next_filed(ASSIGN)) is not None:
                placed = msg.meta.get("stages")
                stage = placed.get(self.id, self.stage) if isinstance(placed, dict) else None
                if not isinstance(stage, int) or not 0 <= stage < self.p.stages:
                    self._reject(msg, f"no valid stage for {self.id} in {str(placed)[:80]}")
                    continue
                self.stage = stage
                log.info("placed on stage %d", self.stage)
                return
            self.channel.pull(0, timeout=1.0)
        raise ConnectionError("pipeline.auto_assign: no placement arrived")

    # ------------------------------------------------------------- shutdown
    @property
    def ckpt_path(self) -> Path:
        return checkpoint_file(self.out / "checkpoints", self.id)

    def _checkpoint_state(self) -> dict[str, Any]:
        """The stage's weights for ``loco eval-skips`` and its whole state for a restart
        (``_resume_own``)."""
        tensors, meta = self._stage_state()
        return {"pipeline": {"stage": self.stage, "stages": self.p.stages},
                "model": self.model.state_dict(), "iteration": self.it,
                "stage_state": {"tensors": tensors, "meta": meta}, "model_config": self.cfg.model.model_dump()}

    def _save(self) -> None:
        """Hand a copy of the checkpoint to the background writer (it keeps the previous
        ``train.keep_checkpoints`` beside it; writes are atomic); a failure is logged and
        recorded, never raised: training goes on."""
        if self._unreadable_checkpoint:
            self._checkpoint_failed(self.it, OSError(f"{self.ckpt_path} could not be read at the start and is "
                                                     "kept as it was"))
            return
        if self._writer is None:
            self._writer = CheckpointWriter(self.ckpt_path, self.cfg.train.keep_checkpoints, self._checkpoint_failed)
        self._writer.submit(private_copy(self._checkpoint_state()), self.it)
        self._saved_it = self.it

    def _checkpoint_failed(self, it: int, exc: BaseException) -> None:
        # full disk, NaN: the previous checkpoint is kept, training goes on
        log.error("checkpoint to %s failed (%s); the previous one is kept", self.ckpt_path, exc)
        self.metrics.write("checkpoint_failed", round=it, error=str(exc))

    def _periodic_checkpoint(self) -> float:
        """When ``train.checkpoint_every`` / ``checkpoint_interval_s`` say; returns the seconds it took."""
        if not self._cadence.due(self.it):
            return 0.0
        t0 = time.monotonic()
        self._save()
        return time.monotonic() - t0

    def _final_checkpoint(self) -> None:
        if self._saved_it != self.it:  # (not again what the last periodic one wrote)
            self._save()
        if self._writer is not None:
            self._writer.close()  # written before "stop" is recorded
        self.metrics.write("stop", step=self.it, round=self.it, bytes_sent=self.transport.bytes_sent,
                           bytes_recv=self.transport.bytes_recv, dropped=dict(self.transport.dropped),
                           sent_by_kind=dict(self.transport.sent_by_kind), sent_to=dict(self.transport.sent_to))

    def _leave(self) -> None:
        self.membership.leave()
        self.membership.shutdown()
