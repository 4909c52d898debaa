"""The algorithms whose round ends in one outer step: ``loco.DiLoCo``, ``loco.CO2`` and
``loco.NoLoCo`` (the update rules are in ``loco.optim``; docs/ALGORITHMS.md has them)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from loco.node.gossip_member import OneProcessParts, PartedGossipCommunicator
from loco.node.sync import SwarmCommunicator
from loco.optim import CO2 as CO2Math
from loco.optim import DiLoCo as DiLoCoMath
from loco.optim import NoLoCo as NoLoCoMath
from loco.optim import OuterStepResult, ReduceResult
from loco.protocols.codecs import Compressor
from loco.protocols.collective import GroupAllReduce, RoundResult
from loco.protocols.gossip import GroupExchange
from loco.protocols.messages import CO2_RESULT
from loco.protocols.state_sync import StateServer, fetch_state

from .algorithm import OuterAlgorithm
from .options import collective_timeouts
from .rank_gossip import RankParts
from .split_state import SplitOuterState

log = logging.getLogger(__name__)



class CollectiveAlgorithm(OuterAlgorithm):
    """An algorithm that averages through the group all-reduce (DiLoCo, CO2, Streaming, DDP)."""

    peer_lag: int = 1
    exchanges_per_rank = True
    _zero_weight: bool = False  # the next outer step contributes with weight 0 (just restored)

    def _peer_round(self, sync_id: int) -> int:
        """The round members of reduce ``sync_id`` announce in the DHT while it runs."""
        return sync_id

    def _communicator(self, state_hash: Callable[[], str]) -> SwarmCommunicator:
        self.collective = GroupAllReduce(self.swarm.transport, lambda: self.swarm.peers(strict=True),
                                         collective_timeouts(self.timeouts),
                                         self.compressor, self.stop_event, max_norm_ratio=self.timeouts.max_norm_ratio,
                                         departed=lambda: self.swarm.membership.departed, ranks=self.lanes)
        self.swarm_comm = SwarmCommunicator(self.collective, state_hash, peer_round=self._peer_round,
                                            lag=self.peer_lag)
        return self.swarm_comm

    def _contribute_nothing(self) -> None:
        self._zero_weight = True  # read by the next outer step (_outer_round)

    def _skip_syncs_to(self, sync_id: int) -> None:
        # peers that expect this process in one of those syncs (their view shows its
        # announced round, which for CO2 also fits the round before) must not wait for it,
        # nor follow it there (``_first_after``: the first sync the adopted state lacks).
        self.collective.skip_to(self._first_after(sync_id), [p.endpoint for p in self.swarm.peers()])

    def _fetching(self, sync_id: int | None) -> None:
        # a peer that elected this process leader of a sync the fetched state will hold must
        # not wait on it meanwhile (its snapshot may wait on that sync: a deadlock)
        self.collective.away(0 if sync_id is None else self._first_after(sync_id))

    def _first_after(self, sync_id: int) -> int:
        """The first sync a state published at ``sync_id`` lacks: a Streaming snapshot at a
        step holds that step's sync; one at a round (DiLoCo, CO2) is where that round's sync
        starts."""
        return sync_id + 1 if self.fine_grained else sync_id

    def _launch_hash(self) -> str:
        # the hash is fixed by the training thread before a reduce starts, because CO2 and
        # Streaming DiLoCo run the reduce on a background thread while the state moves on
        return self._hash_at_launch

    def _outer_round(self) -> tuple[OuterStepResult | None, tuple[str, int, str, dict[str, Any]] | None]:
        """Catch up, run the outer step, and classify a result that is not a plain success.
        Returns (result, outcome): outcome set when the round ended otherwise."""
        if self._catch_up():
            return None, ("resync", 0, "behind the swarm", {})
        t0 = time.monotonic()
        self._hash_at_launch = self.snapshot.digest if self.snapshot is not None else ""  # (hashed in the background)
        hash_wait_s = time.monotonic() - t0
        self.swarm_comm.weight = 0.0 if self._zero_weight else 1.0
        self._zero_weight = False
        try:
            result = self.math.outer_step(self._sync_id())
        finally:
            self.swarm_comm.weight = 1.0
        extra = self._outer_metrics(result)
        extra["hash_wait_s"] = hash_wait_s
        detail = result.reduce.detail if result.reduce is not None else None
        last = detail if isinstance(detail, RoundResult) else None
        if last is not None:  # where the (last) all-reduce's time went; see GroupAllReduce.all_reduce
            extra |= {k: last.timings[k] for k in ("matchmaking_s", "data_s", "commit_s") if k in last.timings}
        if last is not None and last.suspects:
            extra["suspects"] = last.suspects
            self._event("suspects", round=self.round, suspects=last.suspects)
        if not result.applied and self.stop_event.is_set():
            # stopping: this round did not happen here. Keep round and step as they are, so
            # peers never see us "ahead" and a restart redoes just this outer step.
            return result, None
        self.round_step = 0
        self.round += 1
        if last is not None and last.status == "resync":  # the leader finished this round without us
            if self._resync_from(last.leader_endpoint, self.round, last.reason):
                return result, ("resync", 0, last.reason, extra)
            return result, ("skipped", 1, f"resync failed ({last.reason})", extra)
        if result.applied:
            return result, ("ok", result.group_size, "", extra)
        return result, ("skipped", 1, last.reason if last is not None else "", extra)

    def _outer_metrics(self, result: OuterStepResult) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        self._maybe_plan(result, extra)
        return extra


class DiLoCo(CollectiveAlgorithm):
    """DiLoCo: every ``inner_steps`` steps, all-reduce the pseudo-gradient φ − θ and take an
    outer Nesterov-SGD step on φ; θ ← φ. Members of an ok round hold bit-identical weights."""

    name = "diloco"
    splits_outer_state = True

    def __init__(self, model, inner_optimizer, swarm, *, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 nesterov: bool = True, outer_state_device: Literal["auto", "cpu"] = "auto", **kwargs: Any):
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.outer_state_device = outer_state_device
        super().__init__(model, inner_optimizer, swarm, **kwargs)

    def _build(self) -> None:
        self._hash_at_launch = ""
        self.comm = self._staged(self._communicator(self._launch_hash))
        state_device = "cpu" if self.outer_state_device == "cpu" else None
        self.math = DiLoCoMath(self.params, self.comm, self.outer_lr, self.outer_momentum, self.nesterov,
                               state_device)

    def _sync_round(self, final: bool):
        result, outcome = self._outer_round()
        return outcome


class CO2(CollectiveAlgorithm):
    """CO2: the all-reduce of round t runs in the background during round t+1 and is applied
    one round late, with a staleness penalty and element-wise momentum clipping."""

    name = "co2"
    splits_outer_state = True
    serves_reduce_results = True
    catch_up_slack = 1
    # a member whose reduce of round r runs has announced r + 1; a slower one may still
    # show r − 1 (its own reduce of r − 1 in flight). Expecting it (lag 2) makes the fast
    # one's reduce wait for it, instead of averaging alone and running ahead.
    peer_lag = 2

    def __init__(self, model, inner_optimizer, swarm, *, outer_lr: float = 0.5, momentum: float = 0.0,
                 clip: float = 1.0, staleness: Literal["fixed", "gap_aware"] = "fixed", penalty: float = 1.0,
                 **kwargs: Any):
        self.outer_lr, self.momentum, self.clip = outer_lr, momentum, clip
        self.staleness, self.penalty = staleness, penalty
        super().__init__(model, inner_optimizer, swarm, **kwargs)

    def _peer_round(self, sync_id: int) -> int:
        return sync_id + 1  # a member announces its next round while its reduce runs

    def _build(self) -> None:
        self._hash_at_launch = ""
        self._serve_s = 0.0
        self.comm = self._staged(self._communicator(self._launch_hash))
        self.math = CO2Math(self.params, self.comm, self.outer_lr, self.momentum, self.clip, self.staleness,
                            self.penalty)
        self.math.on_launch = self._launching
        self.result_server = StateServer(self.swarm.transport, kind=CO2_RESULT, keep=4)

    def _launching(self, stale_round: int, stale: ReduceResult | None) -> None:
        """The reduce of round t joins with the hash of x_t, but its mean is applied to the
        state after the reduce of t − 1 landed. Members that applied different versions of
        that reduce (a group split while peers came and went) would apply round t's mean to
        different weights and still call it ok: so the join hash also names the reduce just
        applied (its group; every member of a group applied the same bits), and the leader
        resynchronizes a member whose history differs one round earlier.

        The mean just applied is served to replicas that adopt this process's state while
        the next reduce is in flight (a failed reduce too, so they need not wait for it),
        now: the next reduce may reuse the buffer it is in."""
        applied = stale is not None and stale.tensors is not None
        tag = ",".join(sorted(stale.members)) if applied else "-"
        self._hash_at_launch = hashlib.blake2b(f"{self._hash_at_launch}|{tag}".encode(), digest_size=8).hexdigest()
        if stale is None:
            return
        t0 = time.monotonic()
        meta = {"group_size": stale.group_size, "ok": applied, "members": list(stale.members)}
        if isinstance(self.math, SplitOuterState):  # every rank serves its region of it
            self.math.serve_result(self.result_server, stale_round, stale, meta)
        else:
            self.result_server.publish(stale_round, [t.reshape(-1) for t in stale.tensors] if applied else [], meta)
        self._serve_s = time.monotonic() - t0

    def _state_meta(self) -> dict[str, Any]:
        return {"pending_round": self.math.pending_round}

    def _load_synchronized(self, tensors, meta, source) -> None:
        pending = int(meta.get("pending_round", -1))
        # (its own state restored after going non-finite: the reduce in flight was its own,
        # which loading discards, as a split outer state does; nothing to fetch from itself)
        fetch = (lambda: self._fetch_result(source, pending)) if pending >= 0 and source != self.swarm.endpoint \
            else None
        self.math.load_synchronized(tensors, int(meta.get("outer_steps", 0)), pending=fetch)

    def _fetch_result(self, endpoint: str, round: int) -> ReduceResult:
        """The mean of reduce ``round``, from the peer whose state this process adopted."""
        snap = fetch_state(self.swarm.transport, endpoint, round, self.join_timeout_s, self.stop_event,
                           alive=self._source_alive(endpoint), kind=CO2_RESULT)
        # the mean comes one tensor per layer (or as one flat vector) and must cover the model
        # (the whole model: ``trained`` is the model's parameters, sharded or not)
        fits = snap is not None and len(snap.tensors) in (1, len(self.trained)) and \
            sum(t.numel() for t in snap.tensors) == sum(p.numel() for p in self.trained)
        if snap is not None and snap.round == round and snap.meta.get("ok") is False:
            log.info("CO2 reduce %d failed at %s too: nothing to apply", round, endpoint)
            return ReduceResult(None, 1)
        if snap is None or snap.round != round or not snap.meta.get("ok") or not fits:
            log.warning("no usable CO2 reduce %d from %s; its update is skipped here", round, endpoint)
            return ReduceResult(None, 1)
        members = snap.meta.get("members")
        members = tuple(str(m) for m in members) if isinstance(members, list) else ()
        log.info("fetched the mean of CO2 reduce %d from %s, which this process missed", round, endpoint)
        return ReduceResult(snap.tensors, int(snap.meta.get("group_size", 1)), members)

    def _sync_round(self, final: bool):
        sent0 = self.swarm.bytes_queued
        result, outcome = self._outer_round()
        if outcome is None:
            return None
        status, group, reason, extra = outcome
        # its reduce ran in the background during the round
        sync_bytes = [sent0 - self._round_bytes0]
        if final and status != "resync":
            # the last round: its reduce would land in a round that never comes; apply it now
            s1 = self.swarm.bytes_queued
            flushed = self.math.flush()
            extra["flushed"] = bool(flushed is not None and flushed.applied)
            if extra["flushed"]:
                sync_bytes.append(self.swarm.bytes_queued - s1)
        extra["sync_bytes"] = sync_bytes
        if status == "skipped" and result is not None and result.reduce is None:
            return "ok", 0, "first round: nothing to apply yet", extra
        return status, group, reason, extra

    def _flush(self) -> None:
        self.math.flush()

    def _outer_metrics(self, result: OuterStepResult) -> dict[str, Any]:
        extra = super()._outer_metrics(result)
        pen = result.extra["penalty"]
        rr = result.reduce.detail if result.reduce is not None else None
        extra.update({"stale_round": result.extra["stale_round"], "wait_s": result.extra["wait_s"],
                      "reduce_s": rr.timings.get("total_s", 0.0) if isinstance(rr, RoundResult) else 0.0,
                      "penalty_max": max(pen) if pen else 1.0, "penalty_mean": sum(pen) / len(pen) if pen else 1.0})
        if result.reduce is not None:  # (served inside the outer step: ``_launching``)
            extra["serve_s"], self._serve_s = self._serve_s, 0.0
        return extra

    def close(self) -> None:
        super().close()
        self.result_server.close()


class NoLoCo(OuterAlgorithm):
    """NoLoCo: no all-reduce; every ``inner_steps`` steps each process averages [φ, θ − φ]
    with a random partner (pairs drawn from the round and the DHT roster) and applies
    δ ← αδ + β·d̄ − γ(φ − φ̄). Replicas differ by design; ``drift`` measures how far.
    The partners' leaders agree first, then the data goes rank to rank
    (node/gossip_member.py): with FSDP inside a member, every rank keeps and gossips its own
    region of the outer state."""

    name = "noloco"
    catch_up_slack = 2
    replicas_identical = False
    exchanges_per_rank = True
    rank_exchange_needs_split = True
    splits_outer_state = True

    def __init__(self, model, inner_optimizer, swarm, *, alpha: float = 0.5, beta: float = 0.7, gamma: float = 0.7,
                 group_size: int = 2, exchange_timeout_s: float = 30.0, **kwargs: Any):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.group_size, self.exchange_timeout_s = group_size, exchange_timeout_s
        super().__init__(model, inner_optimizer, swarm, **kwargs)

    def _build(self) -> None:
        # no collective at all: nothing answers JOINs. The handshake carries no data (nothing to compress).
        self.gossip = GroupExchange(self.swarm.transport, Compressor("none"), self.stop_event,
                                    live=lambda: [p.id for p in self.swarm.peers()])
        member = RankParts(self.lanes, self.shards, self.swarm.transport, self.compressor, self.stop_event) \
            if self.lanes is not None else OneProcessParts(self.swarm.transport, self.compressor, self.stop_event)
        self.gossip_comm = PartedGossipCommunicator(self.gossip, member, self.swarm.id, self.swarm.peers,
                                                    self.group_size, self.exchange_timeout_s, self.seed,
                                                    peer_round=lambda: self.round,
                                                    max_norm_ratio=self.timeouts.max_norm_ratio)
        self.comm = self._staged(self.gossip_comm)
        self.math = NoLoCoMath(self.params, self.comm, self.alpha, self.beta, self.gamma)

    def _skip_syncs_to(self, sync_id: int) -> None:
        # partners that chose this process for an exchange the adopted state already holds
        # get a decline at once instead of waiting for it
        self.gossip_comm.skip_to(sync_id)

    def _sync_round(self, final: bool):
        if self._catch_up():
            return "resync", 0, "behind the swarm", {}
        result = self.math.outer_step(self.round)
        x = self.gossip_comm.last
        extra: dict[str, Any] = {}
        self._maybe_plan(result, extra)
        if self.gossip_comm.suspects:
            extra["suspects"] = self.gossip_comm.suspects
            self._event("suspects", round=self.round, suspects=self.gossip_comm.suspects)
        extra |= {"partners": result.extra["partners"], "drift": result.extra["drift"],
                 "sent_to": x.sent_to if x else [], "adopted": x.adopted if x else [],
                 "exchange_s": x.wait_s if x else 0.0}
        if not result.applied and self.stop_event.is_set():
            return None
        self.round_step = 0
        self.round += 1
        if result.applied:
            return "ok", result.group_size, "", extra
        reason = f"local-only step (declined {x.declined}, silent {x.silent})" if x else "local-only step"
        return "skipped", 1, reason, extra
