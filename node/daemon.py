"""The node daemon: loco's own program on the public library API. It owns the built-in
model, the data and the loop (``Trainer``); the swarm and the algorithm are the library's
(``loco.Swarm``, ``loco.DiLoCo``, ...), built from the config in ``build.py``.

Output folder layout (shared by every node of a local swarm)::

    OUT/config/<node>.json        resolved configuration
    OUT/nodes/<node>.json         how to reach the node (DHT multiaddrs, ZeroMQ endpoint, pid)
    OUT/metrics/<node>.jsonl      metrics (schema: README.md, "Metrics")
    OUT/checkpoints/<node>.safetensors   latest checkpoint (atomic; node/checkpoint.py)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loco import OuterAlgorithm, Ranks, RoundReport, Swarm

from .build import averages_gradients, build_algorithm, open_swarm
from .checkpoint import CheckpointError, checkpoint_file, load_latest, remove_stale_temp_files
from .checkpoint_writer import Cadence, CheckpointWriter, private_copy
from .config import Config
from .follower_node import (
    CHECKPOINT,
    DONE,
    EVALUATE,
    load_shards,
    next_step,
    shard_writer,
    share_trainer_state,
)
from .metrics import MetricsWriter
from .runtime import (
    NodeIdentity,
    NodeRecords,
    attempt,
    default_node_id,
    write_json_atomic,
)
from .shard_files import complete_set, new_tag, versions_kept

if TYPE_CHECKING:  # prometheus_client is imported only where node.metrics_port asks for it
    from .live_metrics import LiveMetrics
from .trainer import Trainer

log = logging.getLogger(__name__)

REMEMBERED_PEERS_PATIENCE_S = 15.0
"""How long a node given no peers keeps trying those it saw last time before it starts the
swarm anew (at its old address, where they find it)."""


class Node:
    def __init__(self, cfg: Config, out: Path, stop: threading.Event | None = None,
                 before_join: Callable[[Config], Config] | None = None, ranks: Ranks | None = None):
        """``before_join``: called with the config once the model, the data and the
        checkpoint are loaded, just before joining; returns the config to join with (the
        CLI's ``--join-file`` waits there for the address of the node to join through).
        ``ranks``: the node's processes when it has several (this is rank 0; the others run
        ``FollowerNode``)."""
        self.cfg = cfg
        self.ranks = ranks
        self.before_join = before_join
        self.out = out
        self.stop = stop or threading.Event()
        self.id = cfg.node.id or default_node_id(out)
        self.started = time.time()
        self.ckpt_path = checkpoint_file(out / "checkpoints", self.id)
        # built by _setup, in this order; each registers its closing on _closing, which the
        # node's end runs in reverse (what setup got as far as creating, and only that)
        self._closing = ExitStack()
        self.metrics: MetricsWriter | None = None
        self.live: LiveMetrics | None = None  # the /metrics endpoint (node.metrics_port)
        self.records: NodeRecords | None = None  # config file, metrics, their copies (closed last)
        self._records: ThreadPoolExecutor | None = None
        self._writer: CheckpointWriter | None = None
        self._shard_writer: CheckpointWriter | None = None  # rank 0's shards (node.parallel fsdp)
        self._shard_files: list[Path] | None = None  # the rank files of the checkpoint resumed from
        self._round_start = time.monotonic()  # where the round's wall time (wall_s) starts
        self._stats_from = (time.monotonic(), 0)  # (when, step) of the stats last published (loco status)
        self.swarm: Swarm | None = None
        self.outer: OuterAlgorithm | None = None
        self._may_checkpoint = False  # until the checkpoint in --out (if any) is loaded
        self._saved: dict[str, Any] | None = None  # that checkpoint, read before joining
        self._saved_from = self.ckpt_path  # its file (an older one where the newest could not be read)
        # the other ranks wait for rank 0's orders between steps (while training, and after the
        # last step until DONE); False when they are elsewhere (setup, a failed collective)
        self._ranks_listening = False

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        closing = self._closing
        self.records = NodeRecords(cfg, self.id, self.out)
        closing.callback(self.records.close)
        self.metrics, self.live = self.records.metrics, self.records.live
        self._records = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loco-records")
        closing.callback(attempt, "records", lambda: self._records.shutdown(wait=True))
        sharded = cfg.node.nproc_per_node > 1 and cfg.node.parallel == "fsdp"
        self._writer = CheckpointWriter(self.ckpt_path, versions_kept(cfg.train.keep_checkpoints) if sharded else
                                        cfg.train.keep_checkpoints, self._checkpoint_failed)
        closing.callback(attempt, "checkpoint writer", self._writer.close)
        self._cadence = Cadence(cfg.train.checkpoint_every, cfg.train.checkpoint_interval_s)
        self.trainer = Trainer(cfg, self.id, exact_clip=averages_gradients(cfg))
        # a checkpoint that cannot be resumed is an error before this node joins anything
        self._saved = self._read_checkpoint()
        if self.ranks is not None:  # the other ranks start from what was just loaded
            share_trainer_state(self.ranks, self.trainer)
            self.trainer.distribute(self.ranks.group)
            load_shards(self.ranks, self.trainer, self._shard_files)
        if self.trainer.sharded:  # rank 0's own shards, beside the other ranks' writers
            self._shard_writer = shard_writer(self.cfg, self.out, self.id, 0, self._checkpoint_failed)
            closing.callback(attempt, "shard writer", self._shard_writer.close)
        if self.before_join is not None:
            self.cfg = cfg = self.before_join(cfg)
            self.records.write_config(cfg)
        self.identity = NodeIdentity(self.out, self.id)
        self.swarm = self._open_swarm(cfg)
        closing.callback(attempt, "swarm", self.swarm.close)
        # (after the final checkpoint, whose shards the other ranks write when told)
        closing.callback(attempt, "the node's other ranks", self._release_ranks)
        if self.live is not None:
            self.live.watch(self.swarm.transport, lambda: len(self.swarm.membership.peers()))
        # joined after the checkpoint is loaded, so a restart compares its own round with the swarm's
        self.outer = build_algorithm(cfg, self.trainer.model, self.trainer.opt, self.swarm,
                                     on_event=self._on_event, join=False, ranks=self.ranks)
        closing.callback(attempt, "final checkpoint", self._final_checkpoint)
        closing.callback(attempt, "algorithm", self.outer.close)  # (first: nothing in flight when it is saved)

    def _open_swarm(self, cfg: Config) -> Swarm:
        """Join through the configured peers and the peers this node saw last time (a restart
        with the same command finds the swarm again), on the same ports and with the same
        DHT identity as before. A node that was given no peers and whose remembered ones are
        all gone starts the swarm anew, as it first did."""
        remembered = self.identity.apply(cfg)
        if not cfg.swarm.initial_peers and remembered.swarm.initial_peers:
            # only remembered peers: most likely restarting with them, and they may be waiting
            # for this node (a whole swarm restarting). Past this short wait it starts anew and
            # they find it at its old address; the whole bootstrap_timeout_s each time kept a
            # restart on a busy machine from starting for a minute
            patience = min(cfg.swarm.bootstrap_timeout_s, REMEMBERED_PEERS_PATIENCE_S)
            remembered = remembered.model_copy(update={
                "swarm": remembered.swarm.model_copy(update={"bootstrap_timeout_s": patience})})
        try:
            swarm = open_swarm(remembered, self.id, self.stop, self.identity.dir)
        except ConnectionError:
            if cfg.swarm.initial_peers or not remembered.swarm.initial_peers or self.stop.is_set():
                raise
            log.warning("none of the %d peers this node saw last time answers; starting the swarm anew",
                        len(remembered.swarm.initial_peers))
            self.identity.forget_peers()
            swarm = open_swarm(self.identity.apply(cfg), self.id, self.stop, self.identity.dir)
        self.identity.remember_ports(swarm.transport.port, swarm.multiaddrs)
        return swarm

    def _announce_self(self) -> None:
        maddrs = self.swarm.multiaddrs
        info = {"id": self.id, "maddrs": maddrs, "endpoint": self.swarm.endpoint, "pid": os.getpid()}
        token = self.swarm.join_token if self.swarm.key else None
        if token:
            info["join"] = token
        if self.live is not None:
            info["metrics"] = self.live.url
        write_json_atomic(self.out / "nodes" / f"{self.id}.json", info)
        print(f"loco node {self.id}", flush=True)
        for m in maddrs:
            print(f"  dht: {m}", flush=True)
        print(f"  zmq: {self.swarm.endpoint}", flush=True)
        if token:  # the key is in it: printed for the operator, like a password
            print(f"  join: loco node start --join {token}", flush=True)

    def _on_event(self, kind: str, fields: dict[str, Any]) -> None:
        self.metrics.write(kind, step=self.trainer.step, **fields)

    # ------------------------------------------------------------ checkpoints
    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The newest readable checkpoint in ``--out`` (None if there is none), its trainer
        state loaded. An unreadable one is moved aside and the previous one used
        (``load_latest``). One written by another configuration is a CheckpointError, and
        nothing is written over it afterwards (``_may_checkpoint`` stays False)."""
        for tmp in remove_stale_temp_files(self.ckpt_path):
            log.info("removed %s, left by a process killed while writing it", tmp.name)
        state, used = load_latest(self.ckpt_path)
        if state is None:
            return None
        saved, runs = state.get("algorithm", "diloco"), self.cfg.optim.algorithm
        if saved != runs:
            raise CheckpointError(f"checkpoint {used} was written by algorithm {saved!r}, this node runs "
                                  f"{runs!r}; it was left as it is: use another --out or move it away")
        if "shards" in state["trainer"] and self.ranks is not None:  # the newest set every rank wrote
            state, used, self._shard_files = complete_set(self.ckpt_path, state, used, self.ranks.size)
        self._fitting(used, lambda: self.trainer.load_state_dict(state["trainer"]))
        self._saved_from = used
        return state

    def _fitting(self, used: Path, load: Callable[[], None]) -> None:
        try:
            load()
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # another model shape, a missing part
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {used} does not fit this configuration ({first}); it was "
                                  f"left as it is: use another --out or move it away") from None

    def _resume(self) -> bool:
        """Resume the outer algorithm from the checkpoint read at setup, if there was one."""
        if self._saved is not None:
            self._fitting(self._saved_from, lambda: self.outer.load_state_dict(self._saved))
            log.info("resumed from %s at round %d, step %d", self._saved_from, self.outer.round, self.trainer.step)
        self._may_checkpoint = True
        return self._saved is not None

    def _checkpoint(self) -> None:
        """Hands a copy of the state to the background writer: training waits only for the
        copy (``checkpoint_s`` in the round's record)."""
        self.identity.remember_peers(self.swarm.known_peers())
        if not self._may_checkpoint:  # the checkpoint in --out was not loaded: never write over it
            return
        tag = None
        if self.trainer.sharded:  # every rank writes its own shards, under one tag
            if not self._ranks_listening:
                log.error("no final checkpoint: the node's ranks stopped before the last step (a sharded "
                          "model's state needs all of them); the previous checkpoint is kept")
                return
            tag = new_tag(self.trainer.step)
            self.ranks.share((CHECKPOINT, tag))
            self._shard_writer.submit(private_copy(self.trainer.shard_state(tag)), self.outer.round)
        # the algorithm's state_dict is a copy already (its contract); the trainer's is live
        state = {"trainer": private_copy(self.trainer.state_dict(tag)), **self.outer.state_dict(), "node": self.id}
        self._writer.submit(state, self.outer.round)

    def _checkpoint_failed(self, round: int, exc: BaseException) -> None:
        # full disk, NaN: the previous checkpoint is kept, training goes on
        log.error("checkpoint to %s failed (%s); the previous checkpoint is kept", self.ckpt_path, exc)
        self.metrics.write("checkpoint_failed", round=round, error=str(exc))

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        try:
            self._setup()
            self._announce_self()
            resumed = self._resume()
            self.outer.join()
            self._ranks_listening = self.ranks is not None
            start_val = self._evaluate()
            self.metrics.write("start", step=self.trainer.step, round=self.outer.round, val_loss=start_val,
                               resumed=resumed, weights_hash=self.outer.weights_hash(),
                               endpoint=self.swarm.endpoint, algorithm=self.cfg.optim.algorithm,
                               device=str(self.trainer.device), tokens=self.trainer.tokens,
                               processes=self.trainer.processes)
            self._restart_round_clock()
            self._loop()
        except BaseException:
            self._ranks_listening = False  # (a collective failed, or a signal cut one short)
            raise
        finally:
            # in reverse order of setup: the algorithm, the final checkpoint, the other ranks,
            # the swarm, the writers, the records; each step logged if it fails, the others still run
            self._closing.close()
        return 0

    def _budget_left(self) -> bool:
        t = self.cfg.train
        return not (
            self.stop.is_set()
            or (t.rounds and self.outer.round >= t.rounds)
            or (t.max_tokens and self.trainer.tokens >= t.max_tokens)
            or (t.max_time_s and time.time() - self.started >= t.max_time_s)
        )

    def _last_step(self) -> bool:
        """The step just taken is training's last: the token or time budget is spent, or it
        ends the last round. Its round then lands what is in flight (CO2, Streaming)."""
        t = self.cfg.train
        ends_round = self.outer.round_step + 1 >= self.cfg.optim.inner_steps
        return bool((t.max_tokens and self.trainer.tokens >= t.max_tokens)
                    or (t.max_time_s and time.time() - self.started >= t.max_time_s)
                    or (ends_round and t.rounds and self.outer.round + 1 >= t.rounds))

    def _evaluate(self) -> float:
        if self.trainer.sharded:  # every rank runs the forward of a sharded model
            self.ranks.share(EVALUATE)
        return self.trainer.evaluate()

    def _loop(self) -> None:
        self._stats_from = (time.monotonic(), self.trainer.step)  # (a resumed node's rate from here)
        # the other ranks of the node (if any) take each step rank 0 decides on
        while next_step(self.ranks, self._budget_left()):
            # the loss stays on the device except where it is recorded: no host sync per step
            self.trainer.train_step(self.outer.sync_gradients, read_loss=False)
            if self.trainer.step % self.cfg.train.log_every == 0:
                self.metrics.write("train", step=self.trainer.step, round=self.outer.round,
                                   loss=self.trainer.mean_loss())
            if self.stop.is_set() and self.ranks is None:  # stopping: no more rounds
                return  # (other ranks wait for this step's outcome: a round stopped now ends at once)
            report = self.outer.step(final=self._last_step())
            if report is None:
                continue
            loss = self.trainer.last_loss()
            t0 = time.monotonic()
            val = self._evaluate()
            t1 = time.monotonic()
            if self._cadence.due(self.outer.round):
                self._checkpoint()
            t2 = time.monotonic()
            self._record_round(report, loss, val, {"eval_s": t1 - t0, "checkpoint_s": t2 - t1,
                                                   "wall_s": t2 - self._round_start})
            self._restart_round_clock()  # evaluation and checkpoint are this round's, not the next one's compute

    def _restart_round_clock(self) -> None:
        self.outer.restart_clock()
        self._round_start = time.monotonic()

    def _record_round(self, report: RoundReport, loss: float, val: float, times: dict[str, float]) -> None:
        """Writes the round's record. Its weights hash may come from the background hash of
        the snapshot just published, so the record is written by the ``loco-records``
        thread once that hash is done; records keep their order. ``times``: eval_s,
        checkpoint_s and the round's wall time, measured on its own: the parts (compute_s,
        comm_s, publish_s, weights_hash_s, eval_s, checkpoint_s) add up to it, and
        ``utilization`` is compute_s over it."""
        extra: dict[str, Any] = dict(times, utilization=report.compute_s / times["wall_s"] if times["wall_s"] > 0
                                     else 1.0)
        if self.trainer.device.type == "cuda":  # peak, for the outer_state_device trade-off
            extra["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.trainer.device) / 1e9
        fields = dict(time=time.time(), step=self.trainer.step, loss=loss, val_loss=val, tokens=self.trainer.tokens,
                      elapsed_s=time.time() - self.started, **(report.fields() | extra))
        line = (f"[{self.id}] round {report.round} {report.status:7s} step {self.trainer.step} loss {loss:.3f} "
                f"val {val:.3f} group {report.group_size} sent {report.bytes_sent / 1e6:.1f} MB")

        def write() -> None:
            try:
                self.metrics.write("outer", **fields, weights_hash=report.weights_hash)
            except Exception:  # a record must not vanish silently on its thread
                log.exception("round %d: writing its record failed", report.round)
            print(line, flush=True)

        self._records.submit(write)
        self._publish_stats(loss, val)

    def _publish_stats(self, loss: float, val: float) -> None:
        """What `loco status` shows of this node: its DHT record carries it from the next
        refresh on."""
        now, step = time.monotonic(), self.trainer.step
        last_at, last_step = self._stats_from
        t = self.swarm.transport
        self.swarm.publish_stats({
            "step": step, "loss": loss, "val_loss": val, "tokens": self.trainer.tokens,
            "steps_per_s": (step - last_step) / (now - last_at) if now > last_at else 0.0,
            "bytes_sent": t.bytes_sent, "bytes_recv": t.bytes_recv,
            **{k: v for k, v in self.outer.outcomes.items() if k in ("ok", "skipped", "resync", "partial")}})
        self._stats_from = (now, step)

    # ------------------------------------------------------------- shutdown
    def _release_ranks(self) -> None:
        """The other ranks wait for rank 0's orders: tell them the node is done."""
        if self._ranks_listening:
            self.ranks.share(DONE)

    def _final_checkpoint(self) -> None:
        self._records.submit(lambda: None).result()  # the last round's record before "stop"
        self._checkpoint()
        self._writer.flush()  # written before "stop" is recorded
        if self._shard_writer is not None:
            self._shard_writer.flush()
        t = self.swarm.transport
        self.metrics.write("stop", step=self.trainer.step, round=self.outer.round, outcomes=self.outer.outcomes,
                           bytes_sent=t.bytes_sent, bytes_recv=t.bytes_recv, dropped=dict(t.dropped),
                           sent_by_kind=dict(t.sent_by_kind), sent_to=dict(t.sent_to))

