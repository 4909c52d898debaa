"""The node daemon: wires transport, DHT membership, collective, optimizer and trainer
together and runs rounds until the budget is spent or it is told to stop.

Output folder layout (shared by every node of a local swarm)::

    OUT/config/<node>.json        resolved configuration
    OUT/nodes/<node>.json         how to reach the node (DHT multiaddrs, ZeroMQ endpoint, pid)
    OUT/metrics/<node>.jsonl      metrics (schema: README.md, "Metrics")
    OUT/checkpoints/<node>.pt     latest checkpoint (atomic)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from loco.optim import (
    CO2,
    DataParallel,
    DiLoCo,
    NoLoCo,
    OuterStepResult,
    ReduceResult,
    StreamingDiLoCo,
    strided_fragments,
)
from loco.optim.streaming import FragmentEvent
from loco.protocols.codecs import Compressor, codec_family
from loco.protocols.codecs.lgreco import make_plan, plan_digest
from loco.protocols.collective import CollectiveTimeouts, GroupAllReduce, RoundResult
from loco.protocols.gossip import GroupExchange
from loco.protocols.membership import Membership, PeerInfo
from loco.protocols.shaper import Cut, LinkProfile, Shaper
from loco.protocols.state_sync import Snapshot, StateServer, fetch_state, tensors_hash
from loco.protocols.transport import Transport

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, LinkConfig, NetworkConfig, config_to_dict, parse_bandwidth
from .metrics import MetricsWriter
from .optstate import adam_step, adam_tensors, load_adam
from .reaper import Reaper, descendants
from .staging import StagedCommunicator
from .sync import GossipCommunicator, SwarmCommunicator
from .trainer import Trainer

log = logging.getLogger(__name__)

CO2_RESULT = "CO2_RESULT"  # recent CO2 reduce results, for replicas that adopted a peer's state


def default_node_id(out: Path) -> str:
    """Stable across restarts with the same output folder, unique across folders/hosts."""
    digest = hashlib.blake2b(f"{socket.gethostname()}:{out.resolve()}".encode(), digest_size=3).hexdigest()
    return f"node-{digest}"


def _link_profile(link: LinkConfig, with_bandwidth: bool) -> LinkProfile:
    bw = parse_bandwidth(link.bandwidth) if (with_bandwidth and link.bandwidth) else None
    return LinkProfile(bw, link.latency_ms / 1e3, link.jitter_ms / 1e3, link.loss)


def build_shaper(net: NetworkConfig, seed: int, started: float) -> Shaper:
    """The node's uplink bandwidth is shared by all its links; per-link entries may add
    their own bandwidth limit on top."""
    epoch = net.epoch or started
    return Shaper(
        default=_link_profile(net, with_bandwidth=False),
        per_peer={peer: _link_profile(link, with_bandwidth=True) for peer, link in net.links.items()},
        uplink_bps=parse_bandwidth(net.bandwidth) if net.bandwidth else None,
        cuts=[Cut(c.peer, epoch + c.start_s, epoch + c.end_s) for c in net.cuts],
        seed=seed,
    )


def open_transport(cfg: Config, node_id: str, started: float) -> Transport:
    """The node's ZeroMQ endpoint, signed with the swarm key, shaped by its network profile."""
    key = cfg.swarm.key.encode() if cfg.swarm.key else None
    seed = int(hashlib.blake2b(node_id.encode(), digest_size=4).hexdigest(), 16)
    return Transport(node_id, cfg.node.listen_host, cfg.node.port, cfg.node.announce_host, key,
                     shaper=build_shaper(cfg.network, seed=seed, started=started))


def open_membership(cfg: Config, node_id: str) -> tuple[Membership, Reaper]:
    """The node's DHT membership, and a reaper that ends its DHT helpers if the node dies."""
    membership = Membership(cfg.swarm.run_id, node_id, cfg.swarm.initial_peers, cfg.node.listen_host,
                            cfg.node.dht_port, cfg.node.announce_host, cfg.swarm.announce_ttl_s)
    reaper = Reaper()
    if membership.pid:
        reaper.watch([membership.pid, *descendants(membership.pid)])
    return membership, reaper


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class Node:
    def __init__(self, cfg: Config, out: Path, stop: threading.Event | None = None):
        self.cfg = cfg
        self.out = out
        self.stop = stop or threading.Event()
        self.id = cfg.node.id or default_node_id(out)
        self.round = 0
        self.round_step = 0  # inner steps done in the current round
        self.outcomes: dict[str, int] = {"ok": 0, "skipped": 0, "resync": 0, "partial": 0}
        self.started = time.time()
        self.algorithm = cfg.optim.algorithm
        self.ddp_mode = self.algorithm == "ddp"
        # ddp and streaming_diloco sync inside a round: their ids count inner steps
        self.fine_grained = self.algorithm in ("ddp", "streaming_diloco")
        self._announced_round = -1
        self._fragment_bytes0: dict[int, int] = {}  # bytes sent before each fragment in flight
        self._launch_hash = ""  # state hash a (possibly background) all-reduce joins with

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.node.threads:
            torch.set_num_threads(cfg.node.threads)
        _write_json_atomic(self.out / "config" / f"{self.id}.json", config_to_dict(cfg))
        self.metrics = MetricsWriter(self.out / "metrics" / f"{self.id}.jsonl", self.id)
        self._records = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loco-records")
        self.trainer = Trainer(cfg, self.id)
        self.transport = open_transport(cfg, self.id, self.started)
        self.membership, self.reaper = open_membership(cfg, self.id)
        self._build_outer()
        self.state_server = StateServer(self.transport)
        self.result_server = StateServer(self.transport, kind=CO2_RESULT, keep=4) if self.algorithm == "co2" else None
        self.ckpt_path = self.out / "checkpoints" / f"{self.id}.pt"

    def _build_outer(self) -> None:
        """The communicator and outer optimizer of the configured algorithm."""
        cfg, o = self.cfg, self.cfg.optim
        params = self.trainer.params
        device = self.trainer.device

        def staged(comm):  # GPU tensors leave and enter through reused pinned buffers
            return StagedCommunicator(comm, device) if device.type == "cuda" else comm

        state_device = "cpu" if o.outer_state_device == "cpu" else None
        z = cfg.compression
        self.compressor = codec = Compressor(z.codec, z.error_feedback, block=z.block_size, density=z.density,
                                             rank=z.rank, seed=cfg.train.seed)
        if self.algorithm == "noloco":  # no collective at all: nothing answers JOINs
            n = o.noloco
            self.gossip = GroupExchange(self.transport, codec, self.stop,
                                        live=lambda: [p.id for p in self.membership.peers()])
            self.comm = staged(GossipCommunicator(self.gossip, self.id, self.membership.peers, n.group_size,
                                                  n.exchange_timeout_s, cfg.train.seed, peer_round=lambda: self.round))
            self.outer = NoLoCo(params, self.comm, n.alpha, n.beta, n.gamma)
            return
        c = cfg.collective
        timeouts = CollectiveTimeouts(c.matchmaking_timeout_s, c.join_timeout_s, c.allreduce_timeout_s,
                                      c.decision_timeout_s, c.max_attempts)
        self.collective = GroupAllReduce(self.transport, self.membership.peers, timeouts, codec, self.stop)
        if self.ddp_mode:  # every step is a collective round; peers announce the coarse round
            self.comm = staged(SwarmCommunicator(self.collective, lambda: tensors_hash(params),
                                                 peer_round=lambda _: self.round))
            self.ddp = DataParallel(params, self.comm)
            self.outer = DiLoCo(params, self.comm, o.outer_lr, o.outer_momentum, o.nesterov, state_device)
            return
        # the hash is fixed by the training thread before a reduce starts, because CO2 and
        # Streaming DiLoCo run the reduce on a background thread while state moves on.
        # peer_round: the round members of reduce `r` announce in the DHT while it runs
        # (the collective expects peers announced there or one round before):
        # diloco: r itself; co2: r + 1 (a member announces its next round while its reduce
        # runs in the background); streaming: r is the send step s, in round (s − 1) // H,
        # whose members may have announced the next round already.
        H = o.inner_steps
        peer_round = {"diloco": lambda r: r, "co2": lambda r: r + 1,
                      "streaming_diloco": lambda r: (r - 1) // H + 1}[self.algorithm]
        # co2: a member whose reduce of round r runs has announced r + 1; a slower one may
        # still show r − 1 (its own reduce of r − 1 in flight). Expecting it (lag 2) makes the
        # fast one's reduce wait for it, instead of averaging alone and running ahead.
        self.comm = staged(SwarmCommunicator(self.collective, lambda: self._launch_hash, peer_round=peer_round,
                                             lag=2 if self.algorithm == "co2" else 1))
        if self.algorithm == "diloco":
            self.outer = DiLoCo(params, self.comm, o.outer_lr, o.outer_momentum, o.nesterov, state_device)
        elif self.algorithm == "co2":
            k = o.co2
            self.outer = CO2(params, self.comm, k.outer_lr, k.momentum, k.clip, k.staleness, k.penalty)
        else:
            st = o.streaming
            names = {id(p): n for n, p in self.trainer.model.named_parameters()}
            fragments = strided_fragments([names[id(p)] for p in params], [p.numel() for p in params],
                                          st.fragments)
            self.outer = StreamingDiLoCo(params, self.comm, fragments, o.inner_steps, o.outer_lr,
                                         o.outer_momentum, o.nesterov, st.overlap, st.mix)

    def _announce_self(self) -> None:
        maddrs = self.membership.maddrs
        info = {"id": self.id, "maddrs": maddrs, "endpoint": self.transport.endpoint, "pid": os.getpid()}
        _write_json_atomic(self.out / "nodes" / f"{self.id}.json", info)
        print(f"loco node {self.id}", flush=True)
        for m in maddrs:
            print(f"  dht: {m}", flush=True)
        print(f"  zmq: {self.transport.endpoint}", flush=True)

    def _peer_info(self) -> PeerInfo:
        return PeerInfo(self.id, self.transport.endpoint, self.round)

    def _sync_id(self) -> int:
        """The collective round id: the outer round, or (ddp, streaming) the swarm-wide step."""
        return self.round * self.cfg.optim.inner_steps + self.round_step if self.fine_grained else self.round

    def _synchronized(self) -> list[torch.Tensor]:
        """What must be identical on every replica. DDP: weights and inner AdamW moments."""
        if not self.ddp_mode:
            return self.outer.synchronized_tensors()
        return [p.detach() for p in self.trainer.params] + adam_tensors(self.trainer.opt, self.trainer.params)

    def _load_synchronized(self, tensors: list[torch.Tensor], meta: dict[str, Any], source: str) -> None:
        steps = int(meta.get("outer_steps", 0))
        if isinstance(self.outer, StreamingDiLoCo):
            self.outer.load_synchronized(tensors, meta.get("fragment_steps", steps))
            return
        if isinstance(self.outer, CO2):
            pending = int(meta.get("pending_round", -1))
            fetch = (lambda: self._fetch_co2_result(source, pending)) if pending >= 0 else None
            self.outer.load_synchronized(tensors, steps, pending=fetch)
            return
        if not self.ddp_mode:
            self.outer.load_synchronized(tensors, steps)
            return
        params = self.trainer.params
        if len(tensors) != 3 * len(params):
            raise ValueError(f"ddp state has {len(tensors)} tensors, expected {3 * len(params)}")
        load_adam(self.trainer.opt, params, tensors[len(params):], int(meta.get("adam_step", 0)))
        with torch.no_grad():
            for p, t in zip(params, tensors[:len(params)], strict=True):
                p.copy_(t)

    def _adam_step(self) -> int:
        return adam_step(self.trainer.opt, self.trainer.params)

    def _fetch_co2_result(self, endpoint: str, round: int) -> ReduceResult:
        """The mean of CO2's reduce ``round``, from the peer whose state this node adopted."""
        snap = fetch_state(self.transport, endpoint, round, self.cfg.swarm.join_timeout_s, self.stop,
                           alive=lambda: any(p.endpoint == endpoint for p in self.membership.peers()),
                           kind=CO2_RESULT)
        if snap is None or snap.round != round or not snap.meta.get("ok") or len(snap.tensors) != 1:
            log.warning("no CO2 reduce %d from %s; its update is skipped here", round, endpoint)
            return ReduceResult(None, 1)
        return ReduceResult(snap.tensors, int(snap.meta.get("group_size", 1)))

    def _publish(self) -> Snapshot | None:
        """Serve the current synchronized state (unless a fragment is in flight: a snapshot
        must be self-contained); tell the DHT when the round changed. Returns the snapshot
        published (None: none)."""
        published = None
        if not (isinstance(self.outer, StreamingDiLoCo) and self.outer.in_flight):
            meta = {"outer_steps": self.outer.outer_steps, "round": self.round, "round_step": self.round_step,
                    "adam_step": self._adam_step(), "algorithm": self.algorithm}
            if isinstance(self.outer, StreamingDiLoCo):
                meta["fragment_steps"] = list(self.outer.fragment_steps)
            if isinstance(self.outer, CO2):
                meta["pending_round"] = self.outer.pending_round
            synced, weights = self._synchronized(), self._weights()
            # the weights lead the state: hash them in the same background pass
            prefix = len(weights) if all(a is b for a, b in zip(weights, synced, strict=False)) else 0
            self.snapshot = published = self.state_server.publish(self._sync_id(), synced, meta, prefix=prefix)
        if self.round != self._announced_round:
            self.membership.announce(self._peer_info())
            self._announced_round = self.round
        return published

    def _weights(self) -> list[torch.Tensor]:
        return list(self.trainer.params) if self.ddp_mode else self.outer.anchor

    # ------------------------------------------------------------ state moves
    def _resume(self) -> bool:
        state = load_checkpoint(self.ckpt_path)
        if state is None:
            return False
        saved = state.get("algorithm", "diloco")
        if saved != self.algorithm:
            raise RuntimeError(f"checkpoint {self.ckpt_path} was written by algorithm {saved!r}, this node runs "
                               f"{self.algorithm!r}: use another --out or remove the checkpoint")
        self.trainer.load_state_dict(state["trainer"])
        self.outer.load_state_dict(state["outer"])
        if "compression" in state:
            self.compressor.load_state_dict(state["compression"])
        self.round, self.round_step = int(state["round"]), int(state["round_step"])
        self.outcomes.update(state.get("outcomes", {}))
        log.info("resumed from %s at round %d, step %d", self.ckpt_path, self.round, self.trainer.step)
        return True

    def _checkpoint(self) -> None:
        state = {"trainer": self.trainer.state_dict(), "outer": self.outer.state_dict(), "algorithm": self.algorithm,
                 "compression": self.compressor.state_dict(),
                 "round": self.round, "round_step": self.round_step, "outcomes": self.outcomes,
                 "node": self.id}
        try:
            save_checkpoint(self.ckpt_path, state)
        except OSError as exc:  # full disk: keep the previous checkpoint and keep training
            log.error("checkpoint to %s failed (%s); the previous checkpoint is kept", self.ckpt_path, exc)
            self.metrics.write("checkpoint_failed", round=self.round, error=str(exc))

    def _resync_from(self, endpoint: str, min_round: int, reason: str) -> bool:
        def source_alive() -> bool:  # a source that left or died is not waited for
            return any(p.endpoint == endpoint for p in self.membership.peers())

        snap = fetch_state(self.transport, endpoint, min_round, self.cfg.swarm.join_timeout_s, self.stop,
                           alive=source_alive)
        if snap is None:
            self.metrics.write("resync_failed", round=self.round, source=endpoint, reason=reason)
            return False
        if snap.meta.get("algorithm", self.algorithm) != self.algorithm:
            self.metrics.write("resync_failed", round=self.round, source=endpoint,
                               reason=f"peer runs {snap.meta.get('algorithm')!r}, this node {self.algorithm!r}")
            return False
        try:
            self._load_synchronized(snap.tensors, snap.meta, endpoint)
        except ValueError as exc:  # a peer with another model: refuse, keep training
            self.metrics.write("resync_failed", round=self.round, source=endpoint, reason=str(exc))
            return False
        old = self.round
        self.round = int(snap.meta.get("round", snap.round))
        self.round_step = int(snap.meta.get("round_step", 0))
        self.metrics.write("resync", step=self.trainer.step, round=self.round, from_round=old,
                           source=endpoint, reason=reason, weights_hash=tensors_hash(self._weights()))
        log.info("resynchronized from %s: round %d -> %d (%s)", endpoint, old, self.round, reason)
        return True

    def _catch_up(self) -> bool:
        """If live peers are ahead of this node, adopt the state of the furthest one.

        CO2 and NoLoCo have no barrier between rounds: a peer one round ahead is normal
        there (CO2's reduce of round r runs during r+1; a NoLoCo node waits only for its
        partner of the round), so only a node further behind (a restart, a late joiner)
        catches up."""
        peers = self.membership.peers()
        if not peers:
            return False
        best = max(p.round for p in peers)
        if best <= self.round + {"co2": 1, "noloco": 2}.get(self.algorithm, 0):
            return False
        source = min((p for p in peers if p.round == best), key=lambda p: p.id)
        first_id = best * self.cfg.optim.inner_steps if self.fine_grained else best
        return self._resync_from(source.endpoint, first_id, f"peers at round {best}")

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        try:
            self._setup()
            self._announce_self()
            resumed = self._resume()
            self.membership.start_refresh(self._peer_info)
            sw = self.cfg.swarm
            want = max(sw.wait_for_peers, 1 if sw.initial_peers else 0)
            if want:
                found = self.membership.wait_for_peers(want, sw.join_timeout_s)
                if len(found) < want:
                    log.warning("%d of %d peers visible after %.0fs; starting anyway",
                                len(found), want, sw.join_timeout_s)
                self._catch_up()
            self._publish()
            start_val = self.trainer.evaluate()
            self.metrics.write("start", step=self.trainer.step, round=self.round, val_loss=start_val,
                               resumed=resumed, weights_hash=tensors_hash(self._weights()),
                               endpoint=self.transport.endpoint, algorithm=self.cfg.optim.algorithm,
                               device=str(self.trainer.device),
                               tokens=self.trainer.tokens)
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _budget_left(self) -> bool:
        t = self.cfg.train
        return not (
            self.stop.is_set()
            or (t.rounds and self.round >= t.rounds)
            or (t.max_tokens and self.trainer.tokens >= t.max_tokens)
            or (t.max_time_s and time.time() - self.started >= t.max_time_s)
        )

    def _loop(self) -> None:
        H = self.cfg.optim.inner_steps
        while self._budget_left():
            t0 = time.monotonic()
            bytes0 = self.transport.bytes_sent
            codec0 = (self.compressor.encode_s, self.compressor.decode_s)
            loss = float("nan")
            comm_s = 0.0
            syncs = {"ok": 0, "failed": 0}
            events: list[FragmentEvent] = []
            finished = self.round
            while self.round_step < H and self._budget_left() and self.round == finished:
                if self.ddp_mode:
                    loss, synced, sync_s = self._ddp_step()
                    comm_s += sync_s
                    syncs["ok" if synced else "failed"] += 1
                else:
                    loss = self.trainer.train_step()
                    self.round_step += 1
                    if isinstance(self.outer, StreamingDiLoCo):
                        t1 = time.monotonic()
                        events += self._streaming_step()
                        comm_s += time.monotonic() - t1
                if self.trainer.step % self.cfg.train.log_every == 0:
                    self.metrics.write("train", step=self.trainer.step, round=self.round, loss=loss)
            if self.stop.is_set():
                return
            extra: dict[str, Any] = {}
            compute_s = time.monotonic() - t0 - comm_s
            if self.ddp_mode or isinstance(self.outer, StreamingDiLoCo):
                if self.round == finished:  # (a resync inside the round has already moved us on)
                    self.round, self.round_step = self.round + 1, 0
                if isinstance(self.outer, StreamingDiLoCo) and not self._budget_left():
                    t1, before = time.monotonic(), self.transport.bytes_sent
                    # the last fragment in flight lands in the final weights
                    events += self._count_sync_bytes(self.outer.drain(), before)
                    comm_s += time.monotonic() - t1
                status, group, reason = self._inner_sync_status(syncs, events)
                if events:
                    extra = {"fragments": [e.fragment for e in events],
                             "sync_bytes": [e.sync_bytes for e in events]}
            else:
                t1 = time.monotonic()
                sent0 = self.transport.bytes_sent
                status, group, reason, extra = self._outer_step()
                comm_s = time.monotonic() - t1
                if status == "stopped":
                    return
                extra["sync_bytes"] = [self.transport.bytes_sent - sent0]
                if isinstance(self.outer, CO2):  # its reduce ran in the background during the round
                    extra["sync_bytes"] = [sent0 - bytes0] + (extra["sync_bytes"] if extra.get("flushed") else [])
            t2 = time.monotonic()
            published = self._publish()
            # host work between rounds (the state's host copy for the state server; its hash
            # runs in the background), counted apart from compute and comm
            extra["publish_s"] = time.monotonic() - t2
            extra["round_bytes"] = self.transport.bytes_sent - bytes0
            extra["encode_s"] = self.compressor.encode_s - codec0[0]
            extra["decode_s"] = self.compressor.decode_s - codec0[1]
            self._record_round(finished, status, group, reason, loss, compute_s, comm_s, extra, published)
            if self.round % self.cfg.train.checkpoint_every == 0:
                self._checkpoint()

    def _inner_sync_status(self, syncs: dict[str, int], events: list[FragmentEvent]) -> tuple[str, int, str]:
        """A round's status when it synchronized inside the round (ddp steps, fragments)."""
        if self.ddp_mode:
            ok, failed, group = syncs["ok"], syncs["failed"], self.ddp.last_group_size
            what = "steps"
        else:
            ok = sum(e.applied for e in events)
            failed, group, what = len(events) - ok, max((e.group_size for e in events), default=1), "fragment syncs"
        status = "ok" if not failed else ("partial" if ok else "skipped")
        reason = f"{failed} of {ok + failed} {what} unsynced" if failed else ""
        return status, group, reason

    def _count_sync_bytes(self, events: list[FragmentEvent], before: int) -> list[FragmentEvent]:
        """Bytes sent since each fragment left (``before``: if it left in this very call);
        while a fragment is in flight, only its own traffic goes out."""
        for e in events:
            e.sync_bytes = self.transport.bytes_sent - self._fragment_bytes0.pop(e.send_step, before)
        return events

    def _streaming_step(self) -> list[FragmentEvent]:
        """After each inner step: finish the fragment whose overlap is over, start the
        fragment whose turn it is. Snapshots are published only with nothing in flight."""
        s = self.round * self.cfg.optim.inner_steps + self.round_step
        self._launch_hash = self.snapshot.digest
        before = self.transport.bytes_sent
        events = self._count_sync_bytes(self.outer.after_inner_step(s), before)
        if self.outer.in_flight_step is not None:
            self._fragment_bytes0.setdefault(self.outer.in_flight_step, before)
        for e in events:
            detail = e.reduce.detail if e.reduce is not None else None
            if isinstance(detail, RoundResult) and detail.status == "resync":
                self._resync_from(detail.leader_endpoint, s + 1, detail.reason)
                return events
        if events and not self.outer.in_flight:
            self._publish()
        return events

    def _ddp_step(self) -> tuple[float, bool, float]:
        """One data-parallel step: forward/backward, gradient average, AdamW (skipped if the
        average did not complete; a diverged or late replica resynchronizes). Returns the
        loss, whether the average completed, and the seconds it took."""
        sync_id = self._sync_id()
        state = {"ok": False, "s": 0.0}

        def sync() -> bool:
            t = time.monotonic()
            state["ok"] = self.ddp.sync_gradients(sync_id)
            state["s"] = time.monotonic() - t
            return state["ok"]

        loss = self.trainer.train_step(sync)
        last = self.comm.last
        if last is not None and last.status == "resync":
            self._resync_from(last.leader_endpoint, sync_id + 1, last.reason)
            return loss, False, state["s"]
        self.round_step += 1
        if self.round_step < self.cfg.optim.inner_steps:
            # a replica that fell out of step asks for the state after the next step: serve
            # every step, not only at round ends, or it would wait a whole round
            self._publish()
        return loss, state["ok"], state["s"]

    def _record_round(self, finished: int, status: str, group: int, reason: str, loss: float,
                      compute_s: float, comm_s: float, extra: dict[str, Any], published: Snapshot | None) -> None:
        """Writes the round's record. Its weights hash comes from the background hash of the
        snapshot just published when the weights lead it (no second copy and hash of the
        model on the training thread), so the record is written by the ``loco-records``
        thread once that hash is done; records keep their order."""
        t0 = time.monotonic()
        val = self.trainer.evaluate()
        extra["eval_s"] = time.monotonic() - t0
        self.outcomes[status] += 1
        wall = compute_s + comm_s
        n = len(self._weights())
        if published is not None and published.prefix == n:
            weights_hash: Callable[[], str] = lambda: published.prefix_digest  # noqa: E731
        else:  # no snapshot of these weights (a Streaming fragment is in flight): hash them now
            t0 = time.monotonic()
            now = tensors_hash(self._weights())
            extra["weights_hash_s"] = time.monotonic() - t0
            weights_hash = lambda: now  # noqa: E731
        if self.trainer.device.type == "cuda":  # peak, for the outer_state_device trade-off
            extra["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.trainer.device) / 1e9
        fields = dict(
            time=time.time(), step=self.trainer.step, round=finished, next_round=self.round, loss=loss,
            val_loss=val, bytes_sent=self.transport.bytes_sent, bytes_recv=self.transport.bytes_recv,
            group_size=group, compute_s=compute_s, comm_s=comm_s,
            utilization=compute_s / wall if wall > 0 else 1.0, status=status, reason=reason,
            tokens=self.trainer.tokens, elapsed_s=time.time() - self.started, **extra,
        )
        line = (f"[{self.id}] round {finished} {status:7s} step {self.trainer.step} loss {loss:.3f} "
                f"val {val:.3f} group {group} sent {self.transport.bytes_sent / 1e6:.1f} MB")

        def write() -> None:
            try:
                self.metrics.write("outer", **fields, weights_hash=weights_hash())
            except Exception:  # a record must not vanish silently on its thread
                log.exception("round %d: writing its record failed", finished)
            print(line, flush=True)

        self._records.submit(write)

    def _outer_step(self) -> tuple[str, int, str, dict[str, Any]]:
        """Returns (status, group size, reason, extra metrics) and leaves self.round at the
        next round."""
        if self._catch_up():
            return "resync", 0, "behind the swarm", {}
        t0 = time.monotonic()
        self._launch_hash = self.snapshot.digest  # (hashed in the background since the last publish)
        hash_wait_s = time.monotonic() - t0
        result = self.outer.outer_step(self._sync_id())
        extra = self._outer_metrics(result)
        extra["hash_wait_s"] = hash_wait_s
        detail = result.reduce.detail if result.reduce is not None else None
        last = detail if isinstance(detail, RoundResult) else None
        if not result.applied and self.stop.is_set():
            # stopping: this round did not happen here. Keep round and step as they are, so
            # peers never see us "ahead" and a restart redoes just this outer step.
            return "stopped", 0, "stopping", extra
        self.round_step = 0
        if last is not None and last.status == "resync":
            self.round += 1  # the leader has finished this round without us
            if self._resync_from(last.leader_endpoint, self.round, last.reason):
                return "resync", 0, last.reason, extra
            return "skipped", 1, f"resync failed ({last.reason})", extra
        self.round += 1
        if isinstance(self.outer, CO2) and not self._budget_left():
            # the last round: its reduce would land in a round that never comes; apply it now
            final = self.outer.flush()
            extra["flushed"] = bool(final is not None and final.applied)
        if result.applied:
            return "ok", result.group_size, "", extra
        if isinstance(self.outer, CO2) and result.reduce is None:
            return "ok", 0, "first round: nothing to apply yet", extra
        reason = last.reason if last is not None else ""
        if isinstance(self.outer, NoLoCo):
            x = self.comm.last
            reason = f"local-only step (declined {x.declined}, silent {x.silent})" if x else "local-only step"
        return "skipped", 1, reason, extra

    def _maybe_plan(self, result: OuterStepResult, extra: dict[str, Any]) -> None:
        """L-GreCo: every K rounds after the warm-up, plan per-layer levels from the averaged
        update just applied. Every member applied the same one, so all plan alike."""
        lg = self.cfg.compression.lgreco
        r = self.round
        if not (lg.enabled and result.applied and result.reduce is not None and result.reduce.tensors
                and r >= lg.warmup_rounds and (r - lg.warmup_rounds) % lg.every_rounds == 0):
            return
        z = self.cfg.compression
        # on the host: the codecs run there, and every member must compute the same plan
        averaged = [t.detach().cpu() for t in result.reduce.tensors]
        plan = make_plan(codec_family(z.codec), self.compressor.base.level, averaged,
                         {"block": z.block_size, "density": z.density, "rank": z.rank}, lg.bins)
        self.compressor.plan = plan.levels
        extra["lgreco"] = {"plan": plan_digest(plan.levels), "levels": [plan.levels[i] for i in sorted(plan.levels)],
                           "error": plan.error, "uniform_error": plan.uniform_error, "bytes": plan.bytes,
                           "uniform_bytes": plan.uniform_bytes}

    def _outer_metrics(self, result: OuterStepResult) -> dict[str, Any]:
        """Algorithm-specific fields of the round record (README: Metrics)."""
        extra: dict[str, Any] = {}
        self._maybe_plan(result, extra)
        if isinstance(self.outer, NoLoCo):
            x = self.comm.last
            extra = {"partners": result.extra["partners"], "drift": result.extra["drift"],
                     "sent_to": x.sent_to if x else [], "exchange_s": x.wait_s if x else 0.0}
        elif isinstance(self.outer, CO2):
            pen = result.extra["penalty"]
            rr = result.reduce.detail if result.reduce is not None else None
            extra = {"stale_round": result.extra["stale_round"], "wait_s": result.extra["wait_s"],
                     "reduce_s": rr.timings.get("total_s", 0.0) if isinstance(rr, RoundResult) else 0.0,
                     "penalty_max": max(pen) if pen else 1.0, "penalty_mean": sum(pen) / len(pen) if pen else 1.0}
            if self.result_server is not None and result.reduce is not None:
                # served to replicas that adopt this node's state while this reduce was in
                # flight; a failed reduce is published too, so they need not wait for it
                t0 = time.monotonic()
                tensors = [t.reshape(-1) for t in result.reduce.tensors] if result.applied else []
                self.result_server.publish(extra["stale_round"], tensors,
                                           {"group_size": result.group_size, "ok": result.applied})
                extra["serve_s"] = time.monotonic() - t0
        return extra

    # ------------------------------------------------------------- shutdown
    def _shutdown(self) -> None:
        """Runs whatever setup got as far as creating, in reverse dependency order."""
        steps = [
            ("outer", self._close_outer), ("outer", self._final_checkpoint), ("membership", self._leave),
            ("transport", lambda: self.transport.close()), ("reaper", lambda: self.reaper.close()),
            ("metrics", lambda: self._records.shutdown(wait=True)), ("metrics", lambda: self.metrics.close()),
        ]
        for needs, step in steps:
            if not hasattr(self, needs):
                continue
            try:
                step()
            except Exception:  # one failing step must not keep the others from running
                log.exception("shutdown of %s failed", needs)

    def _close_outer(self) -> None:
        """Let a reduce in flight (CO2, Streaming) end before its transport does; with the
        stop event set it gives up at once."""
        close = getattr(self.outer, "close", None)
        if close is not None:
            close()

    def _final_checkpoint(self) -> None:
        self._records.submit(lambda: None).result()  # the last round's record before "stop"
        self._checkpoint()
        self.metrics.write("stop", step=self.trainer.step, round=self.round, outcomes=self.outcomes,
                           bytes_sent=self.transport.bytes_sent, bytes_recv=self.transport.bytes_recv,
                           dropped=dict(self.transport.dropped), sent_by_kind=dict(self.transport.sent_by_kind),
                           sent_to=dict(self.transport.sent_to))

    def _leave(self) -> None:
        self.membership.leave()
        self.membership.shutdown()
