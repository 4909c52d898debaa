"""One swarm member made of several processes: the ranks of a torch.distributed group.

Inside the member the ranks train together the way the user's script makes them (DDP, or
any data parallelism that leaves every rank with the same weights after an optimizer step),
over the group's own backend (NCCL on GPUs, gloo on the CPU). Towards the swarm the member
is one: its first rank (the *leader*) holds the ``Swarm`` and the outer algorithm, and it
alone talks to other members; the other ranks (*followers*) get every outcome from it::

    ranks = loco.Ranks()                                     # after init_process_group
    swarm = loco.Swarm(run_id="exp") if ranks.leads else None
    outer = loco.DiLoCo(ddp_model, opt, swarm, inner_steps=500, ranks=ranks)
    ...
    outer.step()                                             # on every rank, after opt.step()

On a follower the constructor returns a ``Follower``. The leader decides each step once and
broadcasts it inside the member (the step's report, and the weights whenever the outer
algorithm wrote them: a round's outer step, a fragment that landed, a state adopted from a
peer), so every rank holds the same weights and reports the same round. A rank that dies
stops the others at their next broadcast (the group's timeout, ``init_process_group``'s
``timeout``): the member leaves the swarm as a whole.

With ``loco.DDP`` (gradients averaged across members every step) the leader broadcasts the
swarm's gradient mean before every optimizer step, and the inner AdamW state along with the
weights when it adopts a peer's; with FSDP inside, every rank averages its own region of the
gradients and keeps its region of the weights and moments instead (region_ddp.py).

With FSDP2 inside (the parameters are DTensors sharded over the ranks) and DiLoCo, Streaming
DiLoCo, CO2 or NoLoCo, every rank keeps the outer state of its own region of the weights and
runs the outer step on it (``RegionWeights``, region_weights.py and split_state.py): no rank
holds the whole model. With ``rank_exchange="leader"`` the leader works on a whole copy of
the weights in host memory (``ShardedWeights``): every rank hands its shards in when a round ends and gets the
result back. The exchange with the swarm leaves from every rank, each with its own region of
the round's vector (rank_exchange.py; NoLoCo's gossip: rank_gossip.py, only where its
outer state is split).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from loco.node.model import unique_parameters
from loco.node.optstate import adam_step, adam_tensors, load_adam
from loco.node.sync import all_finite
from loco.protocols.state_sync import tensors_hash

from .rank_exchange import RankLane, splits_exchange, uses_lanes
from .report import RoundReport


class Ranks:
    """The processes of one swarm member: the ranks of ``group`` (default: the whole
    torch.distributed world, which must be initialized). Rank 0 of the group leads."""

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("loco.Ranks needs torch.distributed initialized first (init_process_group)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._leader = dist.get_global_rank(self.group, 0)
        backend = dist.get_backend(self.group)
        # NCCL broadcasts device tensors; gloo host ones
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        # the small per-step messages (``share``) go over gloo beside NCCL: an NCCL broadcast
        # of a pickled object would wait for the GPU at every step (a host sync in the
        # middle of the caller's queued work)
        self._control = self.group
        if backend == "nccl":
            members = [dist.get_global_rank(self.group, r) for r in range(self.size)]
            self._control = dist.new_group(ranks=members, backend="gloo")

    def side_channel(self, timeout: timedelta | None = None) -> Ranks:
        """The same processes over a new gloo group of their own: its collectives may run on
        another thread than this group's, without the two interleaving (the member's
        exchange, rank_exchange.py). Every rank calls it at the same point; ``timeout``: how
        long a collective on it may wait for the other ranks."""
        members = [dist.get_global_rank(self.group, r) for r in range(self.size)]
        return Ranks(dist.new_group(ranks=members, backend="gloo", timeout=timeout, use_local_synchronization=True))

    @property
    def leads(self) -> bool:
        """This rank speaks for the member in the swarm."""
        return self.rank == 0

    def share(self, obj: Any = None) -> Any:
        """The leader's ``obj`` on every rank (followers pass nothing)."""
        box = [obj if self.leads else None]
        dist.broadcast_object_list(box, src=self._leader, group=self._control, device=torch.device("cpu"))
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self._control)
        return out

    def summed(self, values: list[float]) -> list[float]:
        """Every rank's ``values`` added up element by element (in rank order, so every rank
        gets the same floats), on every rank: shares of sums over the member's whole vector."""
        return [sum(column) for column in zip(*self.all_gather(values), strict=True)]

    @torch.no_grad()
    def scatter_regions(self, flat: torch.Tensor | None, bounds: list[int]) -> torch.Tensor:
        """Rank r's ``flat[bounds[r]:bounds[r + 1]]`` of the leader's ``flat`` (followers
        pass None), as a new CPU float32 tensor."""
        width = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        mine = torch.empty(width, dtype=torch.float32, device=self.device)
        pieces = None
        if self.leads:
            pieces = [torch.zeros(width, dtype=torch.float32, device=self.device) for _ in range(self.size)]
            for r, piece in enumerate(pieces):
                piece[:bounds[r + 1] - bounds[r]].copy_(flat[bounds[r]:bounds[r + 1]])
        dist.scatter(mine, pieces, src=self._leader, group=self.group)
        return mine[:bounds[self.rank + 1] - bounds[self.rank]].cpu()

    @torch.no_grad()
    def gather_regions(self, region: torch.Tensor, bounds: list[int], out: torch.Tensor | None) -> None:
        """Every rank's ``region`` into the leader's ``out`` at ``bounds`` (the inverse of
        ``scatter_regions``; followers pass ``out=None``)."""
        width = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        padded = torch.zeros(width, dtype=torch.float32, device=self.device)
        padded[:region.numel()].copy_(region)
        pieces = [torch.empty_like(padded) for _ in range(self.size)] if self.leads else None
        dist.gather(padded, pieces, dst=self._leader, group=self.group)
        if self.leads:
            for r, piece in enumerate(pieces):
                out[bounds[r]:bounds[r + 1]].copy_(piece[:bounds[r + 1] - bounds[r]])

    @torch.no_grad()
    def stream_regions(self, region: torch.Tensor, bounds: list[int],
                       consume: Callable[[torch.Tensor], None] | None) -> None:
        """Every rank's ``region`` to the leader one at a time, in rank order: the leader
        passes each to ``consume`` (followers pass None) and holds one region at a time,
        never the whole vector."""
        if not self.leads:
            if bounds[self.rank + 1] > bounds[self.rank]:
                dist.send(region.to(self.device), dst=self._leader, group=self.group)
            return
        consume(region)
        for r in range(1, self.size):
            piece = torch.empty(bounds[r + 1] - bounds[r], dtype=region.dtype, device=self.device)
            if piece.numel():
                dist.recv(piece, src=dist.get_global_rank(self.group, r), group=self.group)
            consume(piece.cpu())

    @torch.no_grad()
    def share_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite ``tensors`` on every rank with the leader's (one broadcast per dtype
        and device, through a flat buffer)."""
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for (_, device), ts in groups.items():
            flat = torch.cat([t.detach().reshape(-1) for t in ts]).to(self.device)
            dist.broadcast(flat, src=self._leader, group=self.group)
            flat = flat.to(device)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def check_same_weights(self, tensors: list[torch.Tensor]) -> None:
        """Raise if this rank's ``tensors`` differ from the leader's (a script whose ranks
        did not start from the same weights, or do not keep them equal). Sharded tensors
        (FSDP's) are checked to be sharded over these ranks instead."""
        if any(is_dtensor(t) for t in tensors):
            ShardedWeights.check(tensors, self)
            return
        digest = tensors_hash([t.detach() for t in tensors])
        leader = self.share(digest)
        if digest != leader:
            raise RuntimeError(f"rank {self.rank}'s weights differ from rank 0's ({digest} != {leader}): the ranks "
                               "of a member must hold the same weights (wrap the model in DDP, or load the same "
                               "checkpoint on every rank)")


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's sharded parameter), without importing
    torch.distributed.tensor (0.7 s of every node process's start) where nothing sharded
    anything: no DTensor exists before that module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


class ShardedWeights:
    """The whole weights of a member whose parameters are sharded over its ranks (FSDP2's
    ``fully_shard``: DTensors), held by the leader in host memory for the outer algorithm:
    ``gather`` fills them from every rank's shards, ``scatter`` writes them back into the
    shards. Every rank calls both at the same points (they are collectives over the ranks);
    one parameter at a time is whole on a rank's device while it passes."""

    def __init__(self, params: list[torch.Tensor], ranks: Ranks):
        self.check(params, ranks)
        self.params = params
        self.ranks = ranks
        # the leader's whole copy; the other ranks keep none
        self.full = [torch.empty(p.shape, dtype=p.dtype) for p in params] if ranks.leads else []

    @staticmethod
    def check(params: list[torch.Tensor], ranks: Ranks) -> None:
        if not all(is_dtensor(p) for p in params):
            raise ValueError("some of the model's parameters are sharded (DTensors) and some are not: shard "
                             "the whole model (fully_shard on the root module too)")
        sizes = {p.device_mesh.size() for p in params}
        if sizes != {ranks.size}:
            raise ValueError(f"the model's parameters are sharded over {sorted(sizes)} ranks, the member has "
                             f"{ranks.size}: shard them over the member's ranks (one mesh of ranks.group)")

    @torch.no_grad()
    def gather(self, only: list[int] | None = None) -> None:
        """The shards into the host copy (a collective): every parameter's, or ``only``
        those (indices, the same on every rank)."""
        for i in self._indices(only):
            whole = self.params[i].full_tensor()
            if self.ranks.leads:
                self.full[i].copy_(whole)
            del whole

    @torch.no_grad()
    def scatter(self, only: list[int] | None = None) -> None:
        """The host copy into the shards (a collective): every parameter's, or ``only`` those."""
        from torch.distributed.tensor import distribute_tensor

        for i in self._indices(only):
            p = self.params[i]
            local = p.to_local()
            whole = self.full[i].to(local.device) if self.ranks.leads else \
                torch.empty(p.shape, dtype=p.dtype, device=local.device)
            local.copy_(distribute_tensor(whole, p.device_mesh, p.placements).to_local())

    def _indices(self, only: list[int] | None) -> list[int]:
        return list(range(len(self.params))) if only is None else only

    def all_but(self, indices: list[int]) -> list[int]:
        """Every parameter's index but ``indices``."""
        skip = set(indices)
        return [i for i in range(len(self.params)) if i not in skip]

    def shards_hash(self) -> str:
        """This rank's shards, hashed."""
        return tensors_hash([p.to_local().detach() for p in self.params])

    @property
    def outer_params(self) -> list[torch.Tensor]:
        """What the leader's outer algorithm reads and writes: the whole weights."""
        return self.full

    def member_finite(self) -> bool:
        """Whether the member's weights, as last gathered, are finite (on the leader)."""
        return all_finite(self.full)

    def before_news(self) -> None:
        """On the leader, before a step's news goes to the other ranks (nothing to add here)."""

    def outer_math(self, math: Any, serves_results: bool = False) -> Any:
        """The outer math the leader's algorithm runs (here: the one it built, on the whole weights)."""
        return math


def sharded_weights(algorithm: type, params: list[torch.Tensor], ranks: Ranks | None,
                    split: bool = False, groups: list[list[int]] | None = None) -> ShardedWeights | None:
    """The member's ``ShardedWeights`` when its parameters are sharded (None: whole on
    every rank); a clear error where the algorithm cannot work on sharded weights.
    ``split``: the outer state is split over the ranks (split_state.py), not whole on the leader,
    a region of each of ``groups`` of the parameters (None: one group of them all)."""
    if not any(is_dtensor(p) for p in params):
        return None
    if ranks is None:
        raise ValueError("the model's parameters are sharded (FSDP's DTensors): pass ranks=loco.Ranks() (the "
                         "processes they are sharded over) on every rank")
    if algorithm.gradients_each_step and not split:
        raise ValueError(f"{algorithm.name} averages every step's gradients across members from every rank's "
                         "region of them when the parameters are sharded (FSDP): use rank_exchange='parallel' "
                         "and no L-GreCo")
    if algorithm.gradients_each_step and any(p.dtype != torch.float32 for p in params):
        # (its state is hashed and served as float32 regions: a one-process member's hash of
        # the same weights must be the same)
        raise ValueError(f"{algorithm.name} across members over sharded parameters needs float32 parameters (one "
                         f"is {next(p.dtype for p in params if p.dtype != torch.float32)}): keep them float32 and "
                         "compute in lower precision with FSDP2's MixedPrecisionPolicy")
    if split:
        from .region_weights import RegionWeights  # (it builds on ShardedWeights)

        return RegionWeights(params, ranks, groups)
    return ShardedWeights(params, ranks)


def splits_outer_state(algorithm: Any, params: list[torch.Tensor], ranks: Ranks | None, rank_exchange: str,
                       compression: Any) -> bool:
    """Whether a sharded member's ranks each keep the outer state of their own region
    (split_state.py): an algorithm whose outer math runs per region (DiLoCo, Streaming
    DiLoCo, NoLoCo, CO2), with every rank exchanging its own region
    (``rank_exchange="parallel"``). DDP's, whose gradients are never whole on a rank, also
    in a member of one process (its one region is the whole vector)."""
    if not (algorithm.splits_outer_state and any(is_dtensor(p) for p in params)):
        return False
    alone = algorithm.gradients_each_step and ranks is not None and ranks.size == 1
    return alone or splits_exchange(algorithm, ranks, rank_exchange, compression)


def news(algorithm: Any, report: RoundReport | None, weights: bool | list[int], adam_step: int | None = None,
         fresh_inner_state: bool = False) -> dict[str, Any]:
    """What the leader broadcasts after a step: its position, its report (everything but the
    hash, which each rank computes from its own weights), whether the weights follow,
    whether the inner AdamW state follows (``adam_step``: its step count; DDP adopting a
    peer's state) and whether it starts afresh (sharded weights restored after going
    non-finite)."""
    fields = None if report is None else {
        f.name: getattr(report, f.name) for f in dataclasses.fields(report) if f.name != "_weights_hash"}
    return {"weights": weights, "adam_step": adam_step, "fresh_inner_state": fresh_inner_state,
            "round": algorithm.round, "round_step": algorithm.round_step, "steps": algorithm.steps,
            "outcomes": dict(algorithm.outcomes), "report": fields}


def tell(ranks: Ranks, algorithm: Any, report: RoundReport | None, weights: bool | list[int],
         optimizer: Any = None, shards: ShardedWeights | None = None) -> None:
    """On the leader, after a step: broadcast ``news``, then the weights if ``weights``
    (into the ranks' shards with ``shards``; a list: only those parameters'), then the inner AdamW moments of ``optimizer``
    if one is given (the order ``Follower`` receives them in; a sharded member's ranks reset
    theirs instead)."""
    params = algorithm.params
    moments = optimizer is not None and shards is None
    # a sharded member whose split state holds the inner optimizer's (DDP's: region_ddp.py)
    inner = algorithm.inner_state_regions if shards is not None else None
    if shards is not None:
        shards.before_news()
    step = adam_step(optimizer, params) if moments else None
    if optimizer is not None and inner is not None:
        step = inner.current_adam_step()
    ranks.share(news(algorithm, report, weights, step,
                     fresh_inner_state=optimizer is not None and shards is not None and inner is None))
    if weights:
        if shards is not None:
            shards.scatter(None if weights is True else weights)
        else:
            ranks.share_tensors(params)
    if moments:
        ranks.share_tensors(adam_tensors(optimizer, params))
    elif step is not None:  # every rank writes its region of the moments into its shards
        inner.write_model(step)


class Follower:
    """A follower rank's stand-in for the outer algorithm: the same calls, in the same order
    as on the leader (``step`` after every inner optimizer step, ``join``, ``flush``,
    ``close``), each receiving what the leader decided. Its reports' ``weights_hash`` is the
    hash of this rank's weights: the leader's report hashes the synchronized weights, which
    are the model's weights after a DiLoCo, CO2 or NoLoCo round (the two hashes agree) but
    not Streaming DiLoCo's (its anchor; a follower holds none)."""

    def __init__(self, algorithm: type, model: torch.nn.Module, inner_optimizer: Any, swarm: Any, *,
                 ranks: Ranks, join: bool = True, **_leader_only: Any):
        if swarm is not None:
            raise ValueError(f"rank {ranks.rank} is not the member's leader: give it swarm=None (only rank 0 "
                             "joins the swarm)")
        self.name = algorithm.name
        self.ranks = ranks
        self.params = unique_parameters(model)
        self.inner_optimizer = inner_optimizer
        compression = _leader_only.get("compression", "none")
        rank_exchange = _leader_only.get("rank_exchange", "parallel")
        split = splits_outer_state(algorithm, self.params, ranks, rank_exchange, compression)
        groups = algorithm.weight_groups(model, self.params, _leader_only) if split else None
        self.shards = sharded_weights(algorithm, self.params, ranks, split, groups)
        self._mid_round = not algorithm.reads_weights_at_round_ends_only  # gathers within a round too
        if self.shards is not None:  # with the leader, as its constructor gathers them
            self.shards.gather()
        self.lane = RankLane(ranks, compression, _leader_only.get("timeouts"), _leader_only.get("seed", 0), split) \
            if uses_lanes(algorithm, ranks, rank_exchange, compression, split) else None
        # the outer math of this rank's region (split_state.py), built like the leader's
        self.split = None
        if split:
            from .split_state import SplitFollower

            self.split = SplitFollower(self.shards, self.lane, inner_optimizer)
        self._synced = False
        # DDP: the leader's swarm-wide gradient mean arrives before every optimizer step
        self._hook = inner_optimizer.register_step_pre_hook(self._before_optimizer_step) \
            if algorithm.gradients_each_step and inner_optimizer is not None else None
        self.round = self.round_step = self.steps = 0
        self.outcomes: dict[str, int] = {}
        self.last_report: RoundReport | None = None
        self._joined = False
        self._closed = False
        if join:
            self.join()

    def join(self) -> None:
        self.ranks.check_same_weights(self.params)
        if self.shards is not None:
            self.shards.gather()
        self._receive()
        self._joined = True

    def step(self, final: bool = False) -> RoundReport | None:
        if self._closed:
            raise RuntimeError(f"{self.name} follower is closed")
        if not self._joined:
            self.join()
        self._synced = False
        syncs, read = self.ranks.share() if self.shards is not None and self._mid_round else (False, [])
        if read:  # a sync within the round reads or writes these parameters
            self.shards.gather(read)
        if self.split is not None and syncs:  # this rank's region of the step's syncs
            self.split.serve_step()
        if self.shards is not None and (rest := self.ranks.share()):  # the round ends: the weights not gathered yet
            self.shards.gather(rest)
        return self._receive()

    @property
    def outer_state_bytes(self) -> int:
        """Bytes of outer state this rank keeps (a split outer state: its region's anchor and
        momentum, and the published copy of them it serves; else none: the leader holds it)."""
        return 0 if self.split is None else tensor_bytes(self.split.held_tensors()) + self.split.served_bytes

    @property
    def bytes_sent(self) -> int:
        """What this rank's own endpoint sent (``rank_exchange="parallel"``: its region of
        every round's exchange; 0 when the leader sends everything)."""
        return self.lane.transport.bytes_sent if self.lane is not None else 0

    def sync_gradients(self) -> bool:
        """DDP: receive the leader's swarm-wide gradient mean (False: the average failed and
        this step's update is skipped, as on the leader)."""
        if self._hook is None:
            return True
        self._synced = True
        self._check_lane()
        if self.split is not None:  # sharded: every rank averages its own region of the gradients
            return self.split.math.sync_gradients(self.ranks.share())
        ok = self.ranks.share()
        if ok:
            self.ranks.share_tensors([p.grad for p in self.params if p.grad is not None])
        return ok

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._synced:  # the caller received the mean already
            return
        if not self.sync_gradients():
            for p in self.params:
                p.grad = None

    def flush(self) -> None:
        if self.shards is not None:
            self.shards.gather()
        self._receive()

    def restart_clock(self) -> None:
        pass

    def weights_hash(self) -> str:
        if self.shards is not None:  # (a sharded member's follower: its own shards)
            return self.shards.shards_hash()
        return tensors_hash([p.detach() for p in self.params])

    def state_dict(self) -> dict[str, Any]:
        """Round and step, and (a split outer state) this rank's region of the outer state;
        otherwise the outer state lives on the leader (save the leader's)."""
        state = {"algorithm": self.name, "round": self.round, "round_step": self.round_step, "steps": self.steps,
                 "outcomes": dict(self.outcomes)}
        if self.split is not None:
            state["outer"] = self.split.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.round_step = int(state["round"]), int(state["round_step"])
        self.steps = int(state.get("steps", self.steps))
        if self.split is not None and "outer" in state:  # (else the leader's whole state reaches it)
            self.split.load_state_dict(state["outer"])
        if self._joined:  # the leader publishes what it loaded (every rank its part) and tells the ranks
            self._receive()

    def close(self) -> None:
        self._closed = True
        if self.split is not None:
            self.split.close()
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_lane(self) -> None:
        if self.lane is not None and self.lane.error is not None:
            raise RuntimeError(f"rank {self.ranks.rank} lost the member's exchange channel: {self.lane.error}")

    def _receive(self) -> RoundReport | None:
        """One broadcast from the leader: its position, its report, and its weights if the
        outer algorithm wrote them."""
        self._check_lane()
        news = self.ranks.share()
        while not isinstance(news, dict):  # what the leader asks of a split outer state first
            if self.split is None:
                raise RuntimeError(f"rank {self.ranks.rank}: the leader sent {news!r} where a step's news belongs")
            self.split.serve(news)
            news = self.ranks.share()
        if news["weights"]:
            if self.shards is not None:
                self.shards.scatter(None if news["weights"] is True else news["weights"])
            else:
                self.ranks.share_tensors(self.params)
        if news["fresh_inner_state"]:  # the leader restored the weights and reset its AdamW state
            for p in self.params:
                self.inner_optimizer.state.pop(p, None)
        if news["adam_step"] is not None and self.split is not None:  # (sharded: this rank's region of it)
            self.split.math.write_model(news["adam_step"])
        elif news["adam_step"] is not None:  # the leader adopted a peer's inner optimizer state
            moments = adam_tensors(self.inner_optimizer, self.params)
            self.ranks.share_tensors(moments)
            load_adam(self.inner_optimizer, self.params, moments, news["adam_step"])
        self.round, self.round_step, self.steps = news["round"], news["round_step"], news["steps"]
        self.outcomes = news["outcomes"]
        if news["report"] is None:
            return None
        report = RoundReport(**news["report"], _weights_hash=self.weights_hash)
        self.last_report = report
        return report
