"""The algorithms that synchronize inside a round: ``loco.StreamingDiLoCo`` (a fragment at a
time, on staggered steps) and ``loco.DDP`` (gradients every step, the baseline). Their
collective ids count inner steps; a round is ``inner_steps`` steps of bookkeeping."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from loco.node.optstate import adam_step, adam_tensors, load_adam
from loco.optim import DataParallel, strided_fragments
from loco.optim import StreamingDiLoCo as StreamingMath
from loco.optim.streaming import FragmentEvent, schedule
from loco.protocols.collective import RoundResult
from loco.protocols.state_sync import tensors_hash

from .outer_step import CollectiveAlgorithm
from .region_ddp import RegionDataParallel
from .region_weights import RegionWeights


def _inner_status(ok: int, failed: int, what: str) -> tuple[str, str]:
    status = "ok" if not failed else ("partial" if ok else "skipped")
    return status, (f"{failed} of {ok + failed} {what} unsynced" if failed else "")


class StreamingDiLoCo(CollectiveAlgorithm):
    """Streaming DiLoCo: the model in ``fragments`` parts (strided over the blocks), each
    all-reduced every ``inner_steps`` steps on a staggered schedule; training goes on
    ``overlap`` steps while a fragment is in flight, then θ_p ← mix·θ_p + (1 − mix)·θ̃_p."""
    reads_weights_at_round_ends_only = False

    name = "streaming_diloco"
    fine_grained = True
    splits_outer_state = True

    def __init__(self, model, inner_optimizer, swarm, *, fragments: int = 2, overlap: int = 1, mix: float = 0.5,
                 outer_lr: float = 0.7, outer_momentum: float = 0.9, nesterov: bool = True, **kwargs: Any):
        self.fragments, self.overlap, self.mix = fragments, overlap, mix
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        super().__init__(model, inner_optimizer, swarm, **kwargs)

    def _peer_round(self, sync_id: int) -> int:
        # sync_id is the send step s, in round (s − 1) // H, whose members may have
        # announced the next round already
        return (sync_id - 1) // self.inner_steps + 1

    def _build(self) -> None:
        H, P = self.inner_steps, self.fragments
        if P > H:
            raise ValueError(f"fragments ({P}) must not exceed inner_steps ({H})")
        if self.overlap >= max(1, H // P):
            raise ValueError(f"overlap ({self.overlap}) must be below inner_steps / fragments ({H} // {P} = {H // P})")
        self._hash_at_launch = ""
        self.comm = self._staged(self._communicator(self._launch_hash))
        if isinstance(self.shards, RegionWeights):  # every rank's region of each fragment: one tensor each
            parts = [[p] for p in range(len(self.params))]
        else:
            parts = self.weight_groups(self.model, self.trained, {"fragments": P})
        self.math = StreamingMath(self.params, self.comm, parts, H, self.outer_lr, self.outer_momentum,
                                  self.nesterov, self.overlap, self.mix)
        self._events: list[FragmentEvent] = []
        self._fragment_bytes0: dict[int, int] = {}  # bytes sent before each fragment in flight

    @classmethod
    def weight_groups(cls, model: torch.nn.Module | None, params: list[torch.Tensor],
                      settings: Mapping[str, Any]) -> list[list[int]]:
        """The fragments (parameter indices), strided over the blocks by name."""
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            labels = [names[id(p)] for p in params]
        else:  # no names: parameter i counts as block i
            labels = [str(i) for i in range(len(params))]
        return strided_fragments(labels, [p.numel() for p in params], int(settings.get("fragments", 2)))

    def _sync_group(self, sync_id: int) -> int:
        return schedule(sync_id, self.inner_steps, self.fragments)  # (the sync id is the send step)

    def _outer_steps(self) -> int:
        return self.math.outer_steps

    def _state_meta(self) -> dict[str, Any]:
        return {"fragment_steps": list(self.math.fragment_steps)}

    def _load_synchronized(self, tensors, meta, source) -> None:
        self.math.load_synchronized(tensors, meta.get("fragment_steps", int(meta.get("outer_steps", 0))))

    def _can_publish(self) -> bool:
        return not self.math.in_flight  # a snapshot must be self-contained

    def _count_sync_bytes(self, events: list[FragmentEvent], before: int) -> list[FragmentEvent]:
        """Bytes sent since each fragment left (``before``: if it left in this very call);
        while a fragment is in flight, only its own traffic goes out."""
        for e in events:
            e.sync_bytes = self.swarm.bytes_queued - self._fragment_bytes0.pop(e.send_step, before)
        return events

    def _syncs_now(self) -> tuple[bool, list[int]]:
        fragments = self.math.touched_fragments(self.round * self.inner_steps + self.round_step)
        return bool(fragments), self._params_of(fragments)

    def _params_of(self, fragments: list[int]) -> list[int]:
        """The member's parameters (indices) in ``fragments``."""
        if isinstance(self.shards, RegionWeights):  # (its math's fragment p: the shards' group p)
            return sorted(i for p in fragments for i in self.shards.groups[p].params)
        return sorted(i for p in fragments for i in self.math.fragments[p])

    def _after_inner_step(self) -> None:
        """Finish the fragment whose overlap is over, start the fragment whose turn it is.
        Snapshots are published only with nothing in flight."""
        t0 = time.monotonic()
        s = self.round * self.inner_steps + self.round_step
        self._hash_at_launch = self.snapshot.digest if self.snapshot is not None else ""
        before = self.swarm.bytes_queued
        events = self._count_sync_bytes(self.math.after_inner_step(s), before)
        if self.math.in_flight_step is not None:
            self._fragment_bytes0.setdefault(self.math.in_flight_step, before)
        self._events += events
        # a fragment landed in the weights: those parameters go to the other ranks
        self._params_written.update(self._params_of([e.fragment for e in events]))
        for e in events:
            detail = e.reduce.detail if e.reduce is not None else None
            if isinstance(detail, RoundResult) and detail.status == "resync":
                # the state right after the sync this replica missed: the leader published it
                # when that sync landed. (Asking for one after this step instead had the
                # leader park the request until its next sync, which was waiting for this
                # replica: a 30 s deadlock at every sync.)
                self._resync_from(detail.leader_endpoint, e.send_step + 1, detail.reason)
                break
        # publish after a resync too: the next fragment's JOIN carries the published state's
        # hash, and a stale one (from before the resync) had the leader order a resync at
        # every sync, for good (a replica that once fell behind never averaged again)
        self._inner_comm_s += time.monotonic() - t0
        if events and not self.math.in_flight:
            self._publish_within_round()

    def _sync_round(self, final: bool):
        if self.round_step >= self.inner_steps or final:  # (a resync inside the round has moved us on)
            self.round, self.round_step = self.round + 1, 0
        if not final and self._catch_up():  # left behind: its fragment syncs found nobody at its step
            self._events = []
            return "resync", 0, "behind the swarm", {}
        if final:  # the last fragment in flight lands in the final weights
            before = self.swarm.bytes_queued
            self._events += self._count_sync_bytes(self.math.drain(), before)
        events, self._events = self._events, []
        if not events and not final:  # every sync of the round was in a state adopted from a peer (a late join)
            return "resync", 0, "the adopted state holds this round's syncs", {}
        ok = sum(e.applied for e in events)
        status, reason = _inner_status(ok, len(events) - ok, "fragment syncs")
        group = max((e.group_size for e in events), default=1)
        extra: dict[str, Any] = {}
        if events:
            extra = {"fragments": [e.fragment for e in events], "sync_bytes": [e.sync_bytes for e in events]}
        return status, group, reason, extra

    def _flush(self) -> None:
        self.math.drain()


class DDP(CollectiveAlgorithm):
    """Synchronous data parallelism, the baseline: every step's gradients are averaged over
    the swarm before the inner optimizer's step (through a step pre-hook on it, or an
    explicit ``sync_gradients()`` between backward and the step). A step whose average did
    not complete is skipped (its gradients are dropped). A round is ``inner_steps`` steps
    of bookkeeping; replicas hold identical weights and AdamW moments.

    With FSDP inside a member (sharded parameters) every rank averages its own region of the
    gradients and keeps its region of the weights and moments (region_ddp.py)."""
    reads_weights_at_round_ends_only = False

    name = "ddp"
    fine_grained = True
    gradients_each_step = True
    splits_outer_state = True

    def __init__(self, model, inner_optimizer, swarm, **kwargs: Any):
        if inner_optimizer is None:
            raise ValueError("DDP needs the inner optimizer: it averages gradients before its step")
        super().__init__(model, inner_optimizer, swarm, **kwargs)

    def _build(self) -> None:
        self.region_ddp: RegionDataParallel | None = None
        if isinstance(self.shards, RegionWeights):
            # members join each step's average with the hash of their weights: sharded, the one
            # the last publication (every step) or adoption hashed as the ranks' regions passed
            self.comm = self._staged(self._communicator(lambda: self.math.published_weights_digest()))
            self.region_ddp = RegionDataParallel(self.params, self.comm)
            self.region_ddp.bind_model(self.shards, self.inner_optimizer)
            self.inner_state_regions = self.region_ddp
            self.math = self.region_ddp  # (split over the ranks by OuterAlgorithm)
        else:
            self.comm = self._staged(self._communicator(lambda: tensors_hash(self.params)))
            self.math = DataParallel(self.params, self.comm)
        self._synced = False
        self._syncs = {"ok": 0, "failed": 0}
        self._pending_resync: tuple[str, int, str] | None = None
        self._hook = self.inner_optimizer.register_step_pre_hook(self._before_optimizer_step)

    # the peer round: DDP averages every step but announces once per round
    def _peer_round(self, sync_id: int) -> int:
        return self.round

    def _first_after(self, sync_id: int) -> int:
        # a DDP snapshot is published after a step's update, at the id of the next step: it
        # holds the syncs before ``sync_id``, not that one. (Skipping it too had peers stop
        # expecting a joiner at the very step it was about to run: it came late to every
        # step, fetched the state again, and never caught up.)
        return sync_id

    def _outer_steps(self) -> int:
        return 0

    def _math_state(self) -> dict[str, Any]:
        return {}

    def _load_math_state(self, state: dict[str, Any]) -> None:
        pass

    def _weights(self) -> list[torch.Tensor]:
        return list(self.params)

    def _synchronized(self) -> list[torch.Tensor]:
        """Weights, then the inner AdamW moments: every exp_avg, then every exp_avg_sq (the
        sections a sharded member serves a region of each of)."""
        moments = adam_tensors(self.inner_optimizer, self.params)
        return [p.detach() for p in self.params] + moments[0::2] + moments[1::2]

    def _state_meta(self) -> dict[str, Any]:
        if self.region_ddp is not None:
            return {"adam_step": self.region_ddp.current_adam_step()}
        return {"adam_step": adam_step(self.inner_optimizer, self.params)}

    def _load_synchronized(self, tensors, meta, source) -> None:
        self._inner_state_written = True
        if self.region_ddp is not None:  # this rank's region now, the other ranks' with the step's news
            self.math.load_synchronized(tensors, int(meta.get("adam_step", 0)))
            return
        params = self.params
        n = len(params)
        if len(tensors) != 3 * n:
            raise ValueError(f"ddp state has {len(tensors)} tensors, expected {3 * n}")
        moments = [t for pair in zip(tensors[n:2 * n], tensors[2 * n:], strict=True) for t in pair]
        load_adam(self.inner_optimizer, params, moments, int(meta.get("adam_step", 0)))
        with torch.no_grad():
            for p, t in zip(params, tensors[:n], strict=True):
                p.copy_(t)

    def sync_gradients(self) -> bool:
        """Replace every gradient by the swarm's mean. False: the average did not complete;
        skip this step's update."""
        sync_id = self._sync_id()
        t0 = time.monotonic()
        if self.region_ddp is not None:  # sharded: every rank averages its own region of them
            self.ranks.share(sync_id)
            ok = self.region_ddp.sync_gradients(sync_id)
        else:
            ok = self.math.sync_gradients(sync_id)
        if self.ranks is not None and self.region_ddp is None:  # the member's other ranks step with the mean too
            self.ranks.share(ok)
            if ok:
                self.ranks.share_tensors([p.grad for p in self.params if p.grad is not None])
        self._inner_comm_s += time.monotonic() - t0
        self._synced = True
        self._syncs["ok" if ok else "failed"] += 1
        last = self.comm.last
        if last is not None and last.status == "resync":
            self._pending_resync = (last.leader_endpoint, sync_id + 1, last.reason)
        return ok

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._synced:  # the caller averaged already (and skips the step if it failed)
            return
        if not self.sync_gradients():
            for p in self.trained:  # the optimizer skips parameters without a gradient
                p.grad = None

    def _syncs_now(self) -> tuple[bool, list[int]]:
        # sharded: every step publishes (the other ranks serve their regions of it); the
        # weights are read then, with the moments
        return self.region_ddp is not None, []

    def _after_inner_step(self) -> None:
        self._synced = False
        if self._pending_resync is not None:
            endpoint, min_id, reason = self._pending_resync
            self._pending_resync = None
            self.round_step -= 1  # this step did not happen in the swarm's count
            t0 = time.monotonic()
            self._resync_from(endpoint, min_id, reason)
            self._inner_comm_s += time.monotonic() - t0
            return
        if self.round_step < self.inner_steps:
            # a replica that fell out of step asks for the state after the next step: serve
            # every step, not only at round ends, or it would wait a whole round
            self._publish_within_round()

    def _sync_round(self, final: bool):
        if self.round_step >= self.inner_steps or final:
            self.round, self.round_step = self.round + 1, 0
        syncs, self._syncs = self._syncs, {"ok": 0, "failed": 0}
        if not final and self._catch_up():  # left behind: its steps' averages found nobody
            return "resync", 0, "behind the swarm", {}
        status, reason = _inner_status(syncs["ok"], syncs["failed"], "steps")
        return status, (self.region_ddp or self.math).last_group_size, reason, {}

    def close(self) -> None:
        super().close()
        self._hook.remove()

