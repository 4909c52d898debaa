"""What every outer algorithm of the library does the same way: count the caller's inner
steps, end a round every H of them, serve the synchronized state to peers that join or
fall behind, adopt a peer's state when this process is behind, and time and count each
round. The subclasses (``loco.DiLoCo``, ...) say only what differs: how a round syncs,
what is synchronized, how a peer's state is adopted.

Round clock: a round's ``compute_s`` is the caller's time since the previous round ended
(or since ``restart_clock()``), less what ``step()`` spent on the network inside the round.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch

from loco.node.config import CollectiveConfig, CompressionConfig
from loco.node.model import unique_parameters
from loco.node.staging import StagedCommunicator
from loco.node.sync import all_finite
from loco.protocols.codecs import Layout
from loco.protocols.state_sync import Snapshot, StateServer, tensors_hash

from .adopt import Adopting
from .lgreco_round import plan_if_due
from .options import as_compression, compressor_for
from .rank_exchange import LeaderLanes, uses_lanes
from .ranks import Follower, Ranks, sharded_weights, splits_outer_state, tell, tensor_bytes
from .report import RoundReport
from .split_state import SplitOuterState
from .swarm import Swarm
from .unreachable import UnreachableSources

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundReport], None]
EventCallback = Callable[[str, dict[str, Any]], None]


class OuterAlgorithm(Adopting):
    """Base of the library's algorithms. Call ``step()`` once after every inner optimizer
    step; every ``inner_steps`` calls it runs the round's synchronization and returns a
    ``RoundReport`` (None between rounds)."""

    name: ClassVar[str] = ""
    catch_up_slack: ClassVar[int] = 0
    """How many rounds a peer may be ahead before this process adopts its state (no barrier
    between rounds makes one round normal for CO2, two for NoLoCo)."""
    fine_grained: ClassVar[bool] = False
    """Sync ids count inner steps (DDP, Streaming) instead of rounds."""
    replicas_identical: ClassVar[bool] = True
    """Members of a round hold the same state after it (all but NoLoCo): a state served by
    one peer is then checked against what other peers hold at the same round."""
    witnesses: ClassVar[int] = 2
    """How many other peers are asked to vouch for a state before it is adopted."""
    probe_s: ClassVar[float] = 5.0
    """Catching up, how long a source may take to answer a small request before it is
    taken as unreachable (the full state may then take up to ``join_timeout_s``)."""
    gradients_each_step: ClassVar[bool] = False
    """Averages the gradients before every inner optimizer step (DDP): in a member of several
    processes the leader then broadcasts the mean to the other ranks before their step."""
    exchanges_per_rank: ClassVar[bool] = False
    """In a member of several ranks, every rank sends and averages its own region of the
    round's vector (``rank_exchange="parallel"``; node/api/rank_exchange.py): the algorithms
    that average through the group all-reduce, on whichever thread they run it."""
    rank_exchange_needs_split: ClassVar[bool] = False
    """Its ranks exchange their own regions only where each keeps its region's outer state
    (NoLoCo: a leader holding the whole state sends it whole)."""
    splits_outer_state: ClassVar[bool] = False
    """A sharded member's ranks can each keep the outer state of their own region
    (split_state.py): outer math that runs per region of the weights (norms of whole
    tensors summed over the ranks: CO2's gap-aware penalty)."""
    serves_reduce_results: ClassVar[bool] = False
    """Serves the means of its reduces (CO2: a replica that adopts its state applies the one
    it missed); split over a sharded member's ranks, in parts."""
    inner_state_regions: Any = None
    """A sharded member's regions of the inner optimizer's state it synchronizes, which it
    writes into the ranks' optimizer shards with a step's news (DDP's: region_ddp.py)."""
    reads_weights_at_round_ends_only: ClassVar[bool] = True
    """Reads and writes the weights only when a round ends (and when joining, flushing): a
    member whose weights are sharded over its ranks (FSDP) gathers them there. Streaming
    DiLoCo (fragments mid-round: the parameters ``_syncs_now`` names, gathered at their
    steps) and DDP (every step's gradients) do not."""

    def __new__(cls, *args: Any, ranks: Ranks | None = None, **kwargs: Any):
        # every rank runs the same line; on a follower rank it makes the leader's stand-in
        if ranks is not None and not ranks.leads:
            return Follower(cls, *args, ranks=ranks, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: torch.nn.Module | Iterable[torch.Tensor],
        inner_optimizer: torch.optim.Optimizer | None,
        swarm: Swarm,
        *,
        inner_steps: int = 30,
        compression: str | CompressionConfig = "none",
        timeouts: CollectiveConfig | None = None,
        join: bool = True,
        join_timeout_s: float = 120.0,
        wait_for_peers: int = 0,
        seed: int = 0,
        on_round: RoundCallback | None = None,
        on_event: EventCallback | None = None,
        ranks: Ranks | None = None,
        rank_exchange: str = "parallel",
    ):
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        self.model = model if isinstance(model, torch.nn.Module) else None
        self.params = unique_parameters(model)
        if not self.params:
            raise ValueError("the model has no parameters to train")
        self.trained = self.params  # what the inner optimizer steps (sharded: the ranks' shards)
        split = splits_outer_state(type(self), self.params, ranks, rank_exchange, compression)
        groups = type(self).weight_groups(self.model, self.params, vars(self)) if split else None
        self.shards = sharded_weights(type(self), self.params, ranks, split, groups)
        if swarm is None:
            raise ValueError("swarm is None: only a follower rank (ranks=, not rank 0) runs without a Swarm")
        # the other processes of this member (None: it is this process alone)
        self.ranks = ranks if ranks is not None and (ranks.size > 1 or self.shards is not None) else None
        self._weights_written = False  # since the last broadcast to the other ranks
        self._params_written: set[int] = set()  # some of them only (a Streaming fragment that landed)
        self._inner_state_written = False  # the inner optimizer's state too (DDP adopting a peer's)
        if self.shards is not None:  # in host memory: the whole weights, or (split) this rank's region
            self.shards.gather()
            self.params = self.shards.outer_params
        # a member of several ranks: each sends its own region of the round's vector
        self.lanes = LeaderLanes(self.ranks, swarm, self._split_layout if split else None) \
            if uses_lanes(type(self), self.ranks, rank_exchange, compression, split) else None
        self.inner_optimizer = inner_optimizer
        self.swarm = swarm
        self.inner_steps = inner_steps
        self.compression = as_compression(compression)
        self.timeouts = timeouts or CollectiveConfig()
        self.join_timeout_s = join_timeout_s
        self.wait_for_peers = wait_for_peers
        self.seed = seed
        self.on_round = on_round
        self.on_event = on_event
        self.device = self.params[0].device
        self.round = 0
        self.round_step = 0  # inner steps done in the current round
        self.steps = 0  # inner steps counted since the start of training
        self.outcomes: dict[str, int] = {"ok": 0, "skipped": 0, "resync": 0, "partial": 0}
        self._unreachable = UnreachableSources(swarm.transport)  # sources whose state could not be fetched
        self.last_report: RoundReport | None = None
        self.snapshot: Snapshot | None = None
        self.compressor = compressor_for(self.compression, seed)
        self.state_server = StateServer(swarm.transport)
        self._joined = False
        self._closed = False
        self._inner_comm_s = 0.0  # network time inside the round's steps (DDP, Streaming)
        self._inner_publish_s = 0.0  # states published inside the round's steps (DDP's every step)
        self.restart_clock()
        self._build()
        if self.shards is not None:  # (split: the math of this rank's region, told to the other ranks)
            self.math = self.shards.outer_math(self.math, self.serves_reduce_results)
        if join:
            self.join()

    @classmethod
    def weight_groups(cls, model: torch.nn.Module | None, params: list[torch.Tensor],
                      settings: Mapping[str, Any]) -> list[list[int]] | None:
        """The groups of parameters a split outer state keeps a region of each of (None: one
        group of them all; Streaming DiLoCo: its fragments)."""
        return None

    def _sync_group(self, sync_id: int) -> int:
        """The group of parameters (``weight_groups``) that sync ``sync_id`` averages."""
        return 0

    def _split_layout(self, sync_id: int) -> Layout:
        return self.shards.group_layout(self._sync_group(sync_id))

    # ----------------------------------------------------- for subclasses
    def _build(self) -> None:
        """Create the communicator and the math object."""
        raise NotImplementedError

    def _sync_round(self, final: bool) -> tuple[str, int, str, dict[str, Any]] | None:
        """The round's synchronization: (status, group size, reason, extra metrics), leaving
        ``self.round`` at the next round; None: stopping, the round did not happen."""
        raise NotImplementedError

    def _synchronized(self) -> list[torch.Tensor]:
        """What must be identical on every replica (served to peers that adopt this state)."""
        return self.math.synchronized_tensors()

    def _weights(self) -> list[torch.Tensor]:
        """The synchronized weights (their hash is the round's ``weights_hash``)."""
        return self.math.anchor

    def _state_meta(self) -> dict[str, Any]:
        return {}

    def _load_synchronized(self, tensors: list[torch.Tensor], meta: dict[str, Any], source: str) -> None:
        self.math.load_synchronized(tensors, int(meta.get("outer_steps", 0)))

    def _outer_steps(self) -> int:
        return self.math.outer_steps

    def _math_state(self) -> dict[str, Any]:
        return self.math.state_dict()

    def _load_math_state(self, state: dict[str, Any]) -> None:
        self.math.load_state_dict(state)

    def _after_inner_step(self) -> None:
        """Called by ``step()`` after counting an inner step (Streaming's fragments, DDP)."""

    def _can_publish(self) -> bool:
        return True

    def _skip_syncs_to(self, sync_id: int) -> None:
        """This process adopted a peer's state at ``sync_id``: it runs none of the syncs that
        state already holds."""

    def _fetching(self, sync_id: int | None) -> None:
        """This process is fetching a peer's state at ``sync_id`` (None: the fetch ended)."""

    def _staged(self, comm):
        """GPU tensors leave and enter through reused pinned host buffers."""
        return StagedCommunicator(comm, self.device) if self.device.type == "cuda" else comm

    @property
    def stop_event(self):
        return self.swarm.stop_event

    # --------------------------------------------------------------- public
    def sync_gradients(self) -> bool:
        """Between backward and the inner optimizer's step: DDP averages the gradients here;
        the local-update algorithms do nothing. False: skip this step's update."""
        return True

    def step(self, final: bool = False) -> RoundReport | None:
        """Count one inner step; at the end of a round (every ``inner_steps`` calls, or now
        with ``final=True``: the last step of training, which also lands what is still in
        flight) synchronize and return the round's report."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if not self._joined:
            self.join()
        started = self.round
        self.steps += 1
        self.round_step += 1
        # a sharded member gathers the weights a sync within the round reads or writes
        # (Streaming's fragments): the leader says which, every rank takes part
        syncs, gathered = False, []
        if self.shards is not None and not self.reads_weights_at_round_ends_only:
            syncs, gathered = self.shards.ranks.share(self._syncs_now())
            if gathered:
                self.shards.gather(gathered)
        self._after_inner_step()
        if syncs and isinstance(self.math, SplitOuterState):
            self.math.step_done()  # (the other ranks served this step's syncs: split_state.py)
        report = None
        ends = self.round_step >= self.inner_steps or self.round != started or final
        # a sharded member's ranks gather the whole weights for the round's end, but those
        # this step gathered already: gathering them again would overwrite what the step's
        # syncs wrote (a fragment landing at the round's last step, Streaming DiLoCo with
        # overlap 0) with the shards from before it. None when the step wrote all of them
        # (a peer's state adopted mid-round: a resync at a fragment's sync), which the shards
        # then take whole.
        if self.shards is not None:
            rest = self.shards.ranks.share(self.shards.all_but(gathered) if ends and not self._weights_written
                                           else [])
            if rest:
                self.shards.gather(rest)
        if ends:
            report = self._end_round(started, final)
        self._tell_ranks(report)
        return report

    def flush(self) -> None:
        """After the last step: land what is still in flight in the weights (CO2's last
        reduce, Streaming DiLoCo's last fragment). ``step(final=True)`` does the same and
        reports it with the round."""
        if self.shards is not None:
            self.shards.gather()
        self._flush()
        self._weights_written = True
        self._tell_ranks(None)

    def _syncs_now(self) -> tuple[bool, list[int]]:
        """Whether ``_after_inner_step`` starts or lands a sync at the inner step just
        counted, and the parameters (indices) it reads or writes (the algorithms that sync
        within a round)."""
        return False, []

    def _flush(self) -> None:
        """What ``flush`` lands (the algorithms with something in flight)."""

    def _tell_ranks(self, report: RoundReport | None) -> None:
        """The other ranks of this member learn what this step did (``Follower``); the
        weights go along when something wrote them."""
        weights: bool | list[int] = self._weights_written or report is not None
        if not weights and self._params_written:  # only these (sharded: only these were gathered)
            weights = sorted(self._params_written) if self.shards is not None else True
        adam = self._inner_state_written and self.inner_optimizer is not None
        self._weights_written = self._inner_state_written = False
        self._params_written.clear()
        if self.ranks is None:
            return
        tell(self.ranks, self, report, weights, self.inner_optimizer if adam else None, self.shards)

    def join(self) -> None:
        """Wait for peers (``wait_for_peers``, or one when the swarm was given initial peers),
        adopt the state of a peer that is ahead (a late joiner, a restart), and serve this
        process's state. ``step()`` calls it first if the constructor did not."""
        if self.ranks is not None:  # before a peer's state may replace this rank's weights
            self.ranks.check_same_weights(self.trained)
            if self.shards is not None:
                self.shards.gather()
        want = max(self.wait_for_peers, 1 if self.swarm.initial_peers else 0)
        if want:
            found = self.swarm.wait_for_peers(want, self.join_timeout_s)
            if len(found) < want:
                log.warning("%d of %d peers visible after %.0fs; starting anyway", len(found), want,
                            self.join_timeout_s)
            self._catch_up()
        self._publish()
        self._joined = True
        if self.ranks is not None:
            self._weights_written = True  # a state adopted from a peer, or the start: the same on every rank
            self._tell_ranks(None)
        self.restart_clock()

    def restart_clock(self) -> None:
        """Start the round clock now: time the caller spends between rounds (evaluation, its
        own checkpoint) is then not counted as the next round's compute."""
        self._clock = time.monotonic()
        self._round_bytes0 = self.swarm.bytes_queued
        self._codec0 = (self.compressor.encode_s, self.compressor.decode_s)
        self._inner_comm_s = 0.0
        self._inner_publish_s = 0.0

    @property
    def outer_state_bytes(self) -> int:
        """Bytes of outer state this process keeps: the algorithm's math and the published
        copy it serves (a sharded member's split outer state: its own region of both)."""
        if isinstance(self.math, SplitOuterState):
            return tensor_bytes(self.math.held_tensors()) + self.math.served_bytes + self.state_server.held_bytes
        return tensor_bytes(self._synchronized()) + self.state_server.held_bytes

    def weights_hash(self) -> str:
        """Hash of the synchronized weights now (equal on replicas that should be identical)."""
        if isinstance(self.math, SplitOuterState):  # (no rank holds them whole)
            return self.math.weights_digest()
        return tensors_hash(self._weights())

    def state_dict(self) -> dict[str, Any]:
        """Outer state, error-feedback residuals, round and step: with the caller's own
        checkpoint of the model and inner optimizer, what a restart needs. Its tensors are
        copies (on the device the state lives on): a background writer may save them while
        training goes on."""
        return {"algorithm": self.name, "outer": self._math_state(),
                "compression": self.compressor.state_dict(), "round": self.round, "round_step": self.round_step,
                "steps": self.steps, "outcomes": dict(self.outcomes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("algorithm", "diloco")
        if saved != self.name:
            raise ValueError(f"state was saved by algorithm {saved!r}, this is {self.name!r}")
        self._load_math_state(state["outer"])
        if "compression" in state:
            self.compressor.load_state_dict(state["compression"])
        self.round, self.round_step = int(state["round"]), int(state["round_step"])
        self.steps = int(state.get("steps", self.steps))
        self.outcomes.update(state.get("outcomes", {}))
        if self._joined:
            self._publish()
            if self.ranks is not None:  # the other ranks, in their load_state_dict, take part and hear it
                self._tell_ranks(None)

    def close(self) -> None:
        """Stop background work (a reduce in flight is waited for; with the swarm's stop
        event set it gives up at once) and stop serving state. The swarm stays open."""
        if self._closed:
            return
        self._closed = True
        self._close_math()
        if self.lanes is not None:  # (after the math: a reduce in flight still needs the other ranks)
            self.lanes.close()
        self.state_server.close()

    def _close_math(self) -> None:
        close = getattr(self.math, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ rounds
    def _sync_id(self) -> int:
        """The collective round id: the outer round, or (DDP, Streaming) the swarm-wide step."""
        return self.round * self.inner_steps + self.round_step if self.fine_grained else self.round

    def _restore_if_diverged(self) -> bool:
        """A replica whose own weights went non-finite (a bad batch, a learning-rate spike)
        goes back to its last synchronized state, with a fresh inner optimizer state, instead
        of crashing or offering NaN to the swarm; it then contributes with weight 0 to the
        round at hand (its pseudo-gradient is zero), so the group's average is not damped."""
        if self.shards.member_finite() if self.shards is not None else all_finite(self.params):
            return False
        snap = self.snapshot
        if snap is None:
            raise FloatingPointError("the weights are not finite and there is no synchronized state to restore")
        if self.inner_optimizer is not None:
            for p in self.trained:
                self.inner_optimizer.state.pop(p, None)
        if isinstance(self.math, SplitOuterState):  # (served in parts: every rank restores its own)
            self.math.restore_published(snap)
        else:
            self._load_synchronized(snap.tensors, snap.meta, self.swarm.endpoint)
        self._weights_written = self._inner_state_written = True  # the other ranks' AdamW state is fresh too
        log.warning("round %d: the weights went non-finite; restored the last synchronized state (round %d)",
                    self.round, snap.round)
        self._event("restored", round=self.round, from_round=snap.round, reason="non-finite weights")
        self._contribute_nothing()
        return True

    def _contribute_nothing(self) -> None:
        """The next sync carries weight 0 (the collective algorithms; others have no weights)."""

    def _end_round(self, finished: int, final: bool) -> RoundReport | None:
        if self.device.type == "cuda":
            # the caller's inner steps may still be queued on the device (a loop that never
            # reads its loss): compute ends when they have run, not when they were queued
            torch.cuda.synchronize(self.device)
        t_end = time.monotonic()
        restored = self._restore_if_diverged()
        out = self._sync_round(final)
        if out is None:
            return None
        status, group, reason, extra = out
        if restored:
            extra["restored"] = True
        comm_s = self._inner_comm_s + (time.monotonic() - t_end)
        compute_s = t_end - self._clock - self._inner_comm_s - self._inner_publish_s
        t0 = time.monotonic()
        published = self._publish()
        publish_s = self._inner_publish_s + (time.monotonic() - t0)
        extra.setdefault("sync_bytes", [self.swarm.bytes_queued - self._round_bytes0])
        extra["encode_s"] = self.compressor.encode_s - self._codec0[0]
        extra["decode_s"] = self.compressor.decode_s - self._codec0[1]
        if published is not None and published.prefix:  # the weights lead the published state
            weights_hash: Callable[[], str] = lambda: published.prefix_digest  # noqa: E731
        else:  # no snapshot of these weights (a Streaming fragment is in flight): hash them now
            t1 = time.monotonic()
            now = self.weights_hash()
            extra["weights_hash_s"] = time.monotonic() - t1
            weights_hash = lambda: now  # noqa: E731
        sync_bytes = extra.pop("sync_bytes")
        self.outcomes[status] = self.outcomes.get(status, 0) + 1
        report = RoundReport(finished, self.round, status, reason, group, compute_s, comm_s, publish_s,
                             self.swarm.bytes_sent, self.swarm.bytes_recv,
                             self.swarm.bytes_queued - self._round_bytes0, sync_bytes, extra, weights_hash)
        self.last_report = report
        self.restart_clock()
        if self.on_round is not None:
            self.on_round(report)
        return report

    def _publish_within_round(self) -> None:
        """Publish between a round's steps (timed as the round's publish, not its compute)."""
        t0 = time.monotonic()
        self._publish()
        self._inner_publish_s += time.monotonic() - t0

    def _publish(self) -> Snapshot | None:
        """Serve the current synchronized state (unless a fragment is in flight: a snapshot
        must be self-contained); tell the DHT the round. Returns the snapshot published."""
        published = None
        if self._can_publish():
            meta = {"outer_steps": self._outer_steps(), "round": self.round, "round_step": self.round_step,
                    "algorithm": self.name, **self._state_meta()}
            if isinstance(self.math, SplitOuterState):  # served in parts by the ranks
                published = self.math.publish(self.state_server, self._sync_id(), meta)
            else:
                synced, weights = self._synchronized(), self._weights()
                # the weights lead the state: hash them in the same background pass
                prefix = len(weights) if all(a is b for a, b in zip(weights, synced, strict=False)) else 0
                published = self.state_server.publish(self._sync_id(), synced, meta, prefix=prefix)
            self.snapshot = published
        self.swarm.announce_round(self.round)
        return published

    def _maybe_plan(self, result, extra: dict[str, Any]) -> None:
        """L-GreCo's per-layer levels, when due (see ``lgreco_round.plan_if_due``)."""
        planned = plan_if_due(self.compression, self.compressor, self.round, result)
        if planned is not None:
            extra["lgreco"] = planned

    def _event(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, fields)
