"""A sharded member's outer state split over its ranks: no rank holds the whole of it.

With FSDP inside a member (parameters sharded over its ranks) and DiLoCo, Streaming DiLoCo,
NoLoCo or CO2 across members (or DDP, whose state is the model's: region_ddp.py), every rank
``r`` keeps the outer state of its own region ``[bounds[r], bounds[r + 1])`` of the flat
weight vector (``loco.protocols.regions.split_bounds``: the same regions its endpoint
exchanges): the weights θ of the region, the anchor φ, the outer momentum and the
pseudo-gradient Δ, in host memory (the math's ``STATE_SECTIONS``: a region of each). A
round's end is then local on every rank: θ comes from the FSDP shards one parameter at a
time (``RegionWeights.gather``, region_weights.py), the rank computes its Δ, exchanges it
with the matching regions of the other members from its own endpoint (rank_exchange.py),
applies the outer step to its φ and momentum, and writes θ ← φ back into the shards one
parameter at a time (``RegionWeights.scatter``). Per rank that is 4/k of the model in
float32 instead of a whole copy of every buffer on rank 0, and 2/k more for the published
copy of its region (what a one-process member keeps: 4 + 2).

The leader (rank 0) still speaks for the member: it runs matchmaking and the commit step
and tells the other ranks, in order, what to do (``SplitOuterState``): run the outer step of
a sync, load a whole state it adopted (a peer's, a checkpoint's) of which each keeps its
region, publish the state, or go back to the state last published (after the weights went
non-finite). A published state is served in parts (``loco.protocols.state_sync``): every rank
serves a copy of its region from its own endpoint, and the leader answers a peer's request
with the hash of the whole and where the parts are; the hash (the weights hash peers compare,
too) is computed on the leader as the ranks' regions pass through it one at a time. It is the
hash a one-process member computes of the same state, so a peer fetching the state cannot tell
a member of several ranks from one process, and members of any rank count agree. A
checkpoint is split too: every rank's ``state_dict`` is its own region (``region_state``),
which it saves and loads itself. Only a state adopted whole (a peer's, a one-process
member's checkpoint) is whole on the leader, until its regions go out to the ranks.

The other ranks (``SplitFollower``) run the same outer math over their own region, with the
exchange their lane ran as their communicator (``RegionCommunicator``; NoLoCo's gossip of
its region: rank_gossip.py). An outer step's norms over the weights (NoLoCo's drift) are
summed over the ranks. CO2's gap-aware penalty reads norms of the model's whole tensors:
every rank sums the squares of its pieces of each (``loco.optim.WholeTensors``), the ranks
add them up, and every rank keeps the same statistics (the math's ``replicated_sections``:
state about the whole model, not per weight, which the leader serves and hashes after the
regions and hands the other ranks when it loads or restores a state). CO2's reduce runs on
every rank's background thread, each over its own region, and lands a round later as on the
leader; the mean a reduce landed is served in parts too (``RegionResults``: a peer that
adopts this member's state fetches the mean of the reduce it missed), and a peer's mean this
member must apply after adopting a state reaches each rank as its region (``_PendingRegions``).

Streaming DiLoCo keeps a region of each fragment (``region_weights.WeightGroup``: fragment
p's flat vector cut into one region per rank, what the ranks exchange of it): every rank's
math is Streaming DiLoCo over one tensor per fragment, told every inner step (``AFTER``,
then ``STEP_DONE``) to land the fragment whose overlap is over and send the one whose turn it
is, from the weights gathered at that step. Its state is served and hashed fragment by
fragment, the order a one-process member's ``synchronized_tensors`` has too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from loco.optim import ReduceResult, WholeTensors
from loco.protocols.flat import flat_of, shaped_views, unflatten
from loco.protocols.messages import CO2_RESULT_PART, STATE_PART
from loco.protocols.state_sync import Snapshot, StateServer, StreamHash, parts_meta

if TYPE_CHECKING:
    from .rank_exchange import RankLane
    from .ranks import Ranks
    from .region_weights import RegionWeights

# what the leader tells the other ranks on the member's control channel, besides a step's news
OUTER, LOAD, PUBLISH = "split-outer", "split-load", "split-publish"
HASH, RESTORE, FLUSH = "split-hash", "split-restore", "split-flush"
AFTER, DRAIN, STEP_DONE = "split-after", "split-drain", "split-step-done"  # (Streaming DiLoCo's, every step)
# published parts every rank keeps: the latest, like a one-process member's snapshot. A peer
# that read the leader's answer for one round and asks for the parts after the next round's
# are out (within milliseconds of a round's end) fails that fetch and asks again.
PARTS_KEPT = 1
RESULTS_KEPT = 4  # reduce means every rank keeps its part of (as a one-process CO2 member keeps them whole)


class SplitOuterState:
    """On the leader: its own region's outer math (``math``, built over
    ``RegionWeights.outer_params``), presented to the algorithm as the whole member's (the
    same calls as ``loco.optim.DiLoCo``'s or ``loco.optim.CO2``'s, and ``publish``,
    ``weights_digest``, ``restore_published`` for what a one-process member reads the whole
    state for). The other ranks are told each step in order. No rank holds the whole state:
    it is served in parts (every rank its region, from its own endpoint) and hashed as the
    regions pass through this rank one at a time; only a whole state loaded (a peer's, whose
    regions go out to the ranks) is whole here, until they do. ``serves_results``: the means
    of the reduces landed are served in parts too (CO2, ``serve_result``)."""

    def __init__(self, region: RegionWeights, math: Any, serves_results: bool = False):
        self.region = region
        self.ranks = region.ranks
        self.math = math
        self.shapes = region.shapes  # the whole state's, per section (group by group)
        self.sections = math.STATE_SECTIONS  # (φ first: the weights lead the state)
        self.replicated = _replicated(math)  # state about the whole model, after the sections
        self.steps_key = math.STEPS_KEY  # its checkpoint's name for its step counts
        # a load not yet told: (the whole of every section, outer_steps, reset_params, a mean to
        # apply, the replicated sections)
        self._pending: tuple[list[torch.Tensor], int, bool, _PendingRegions | None, list[torch.Tensor]] | None = None
        self._digests: tuple[str, str] | None = None  # (weights, whole state) now; None: changed since
        self._parts: StateServer | None = None  # this rank's part of every published state
        self._endpoints: list[str] | None = None  # every rank's, where its parts are served
        # the other ranks build the same math over their regions
        self.ranks.share((type(math), math.settings(), serves_results))
        _measure_whole_tensors(region, math)
        self.results = RegionResults(region) if serves_results else None

    @property
    def outer_steps(self) -> int:
        return self.math.outer_steps

    @property
    def pending_round(self) -> int:
        """CO2: the round whose reduce is in flight (-1: none)."""
        return self.math.pending_round

    # ------------------------------------------------ Streaming DiLoCo's (fragments = groups)
    @property
    def fragment_steps(self) -> list[int]:
        return self.math.fragment_steps

    @property
    def in_flight(self) -> bool:
        return self.math.in_flight

    @property
    def in_flight_step(self) -> int | None:
        return self.math.in_flight_step

    def touched_fragments(self, step: int) -> list[int]:
        return self.math.touched_fragments(step)  # (every rank's math runs the same schedule)

    def after_inner_step(self, step: int) -> list[Any]:
        """Every rank: finish the fragment whose overlap is over, start the one whose turn it
        is, each over its own region of it (the weights gathered already, if touched). A
        step without either tells the other ranks nothing (``step_done`` is not called)."""
        self.deliver()
        if not self.math.touched_fragments(step):
            return []
        self.ranks.share((AFTER, step))
        return self._landed(self.math.after_inner_step(step))

    def drain(self) -> list[Any]:
        self.deliver()
        self.ranks.share((DRAIN,))
        return self._landed(self.math.drain())

    def step_done(self) -> None:
        """The other ranks stop serving this inner step's commands (Streaming DiLoCo's)."""
        self.ranks.share((STEP_DONE,))

    def _landed(self, events: list[Any]) -> list[Any]:
        if any(e.applied for e in events):
            self._digests = None
        return events

    def held_tensors(self) -> list[torch.Tensor]:
        """The outer state this rank keeps for its own region (one tensor per section)."""
        return self.math.synchronized_tensors()

    @property
    def served_bytes(self) -> int:
        """Bytes of the published copy of its region this rank keeps to serve."""
        return self._parts.held_bytes if self._parts is not None else 0

    def weights_digest(self) -> str:
        """``tensors_hash`` of the member's whole φ (its synchronized weights), as a
        one-process member computes it."""
        self.deliver()
        if self._digests is None:
            self.ranks.share((HASH,))
            self._digests = _stream_digests(self.region, self.math, self.shapes)
        return self._digests[0]

    def published_weights_digest(self) -> str:
        """The weights digest as last hashed (published, restored or asked for), without
        asking the other ranks: what a DDP member joins its next step's average with."""
        return self._digests[0] if self._digests is not None else ""

    def publish(self, server: StateServer, round: int, meta: dict[str, Any]) -> Snapshot:
        """Serve the state now as published at ``round``: every rank serves its region
        (kind STATE_PART), ``server`` the hash of the whole and where the parts are."""
        self.deliver()
        if self._parts is None:
            self._parts = StateServer(server.transport, kind=STATE_PART, keep=PARTS_KEPT, hashed=False)
        # math whose state lives in the model (DDP's) reads it first: hashed afresh every time
        first, stream = self._endpoints is None, self._digests is None or _reads_model(self.math)
        self.ranks.share((PUBLISH, round, first, stream))
        _read_model(self.math)
        self._parts.publish(round, _served(self.math, leads=True), {})
        if first:
            self._endpoints = self.ranks.all_gather(server.transport.endpoint)
        if stream:
            self._digests = _stream_digests(self.region, self.math, self.shapes)
        assert self._endpoints is not None and self._digests is not None
        groups = [g.shapes for g in self.region.groups]
        replicated = [[tuple(t.shape)] for t in _replicated_tensors(self.math)]  # (served by the leader alone)
        parts = parts_meta(self._endpoints, round, groups * len(self.sections) + replicated)
        return server.publish(round, [], {**meta, "parts": parts}, prefix=len(self.shapes), digests=self._digests)

    def serve_result(self, server: StateServer, round: int, reduce: ReduceResult, meta: dict[str, Any]) -> None:
        """(CO2, while its outer step launches the next reduce: every rank does the same)
        Serve the mean reduce ``round`` landed: every rank its region, ``server`` the hash of
        the whole and where the parts are; a reduce that failed is served as one without tensors."""
        assert self.results is not None, "built without serves_results"
        digest = self.results.publish(round, reduce, server.transport)
        if digest is None:
            server.publish(round, [], meta)
            return
        assert self._endpoints is not None, "a result served before the state"
        parts = parts_meta(self._endpoints, round, [[(p.numel(),) for p in self.region.params]])  # (one group)
        server.publish(round, [], {**meta, "parts": parts}, digests=("", digest))

    def restore_published(self, snapshot: Snapshot) -> None:
        """Go back to this member's state published as ``snapshot`` (θ ← φ too): every rank
        takes its region from its own part of it."""
        assert self._parts is not None, "nothing was published"
        self._pending = None  # (superseded)
        steps = snapshot.meta.get(self.steps_key, snapshot.meta.get("outer_steps", 0))
        replicated = _published_replicated(self._parts, self.math, snapshot.round)
        self.ranks.share((RESTORE, snapshot.round, steps, replicated))
        _restore_part(self._parts, self.math, snapshot.round, steps, replicated)
        self._digests = (snapshot.prefix_digest, snapshot.digest)

    def load_synchronized(self, tensors: Sequence[torch.Tensor], outer_steps: Any, reset_params: bool = True,
                          pending: Callable[[], ReduceResult] | None = None) -> None:
        """Adopt a whole state (a peer's, a checkpoint's; in ``synchronized_tensors``' order,
        group by group): this rank's region now, the other ranks' when they next listen
        (``deliver``: before the next outer step or news). ``outer_steps``: what the math's
        ``load_synchronized`` takes (Streaming DiLoCo: its fragments' step counts).
        ``pending`` (CO2): fetches the mean of the reduce the state's source had in flight;
        the ranks apply their regions of it at their next outer step."""
        n, k = len(self.shapes), len(self.sections)
        mine = _replicated_tensors(self.math)
        if len(tensors) != k * n + len(mine):
            raise ValueError(f"expected {k * n + len(mine)} tensors ({', '.join(self.sections + self.replicated)}), "
                             f"got {len(tensors)}")
        shapes = self.shapes * k + [tuple(t.shape) for t in mine]
        for t, shape in zip(tensors, shapes, strict=True):
            if tuple(t.shape) != shape:
                raise ValueError(f"shape mismatch: local {shape}, received {tuple(t.shape)}")
        replicated = [t.detach().clone() for t in tensors[k * n:]]
        whole, start = [], 0  # every section's every group, as one flat vector each
        for _ in self.sections:
            for g in self.region.groups:
                whole.append(flat_of(tensors[start:start + len(g.params)]).clone())
                start += len(g.params)
        groups = self.region.groups * k
        regions = _PendingRegions(self.ranks, groups[0].bounds, pending) if pending is not None else None
        extra = {"pending": regions.take} if regions is not None else {}
        self.math.load_synchronized([*(w[g.lo:g.hi] for w, g in zip(whole, groups, strict=True)), *replicated],
                                    outer_steps, reset_params=reset_params, **extra)
        self._pending = (whole, outer_steps, reset_params, regions, replicated)
        self._digests = None

    def deliver(self) -> None:
        """The other ranks take their regions of a state loaded since they last listened."""
        if self._pending is None:
            return
        whole, outer_steps, reset_params, regions, replicated = self._pending
        self._pending = None
        self.ranks.share((LOAD, outer_steps, reset_params, regions is not None, replicated))
        for w, g in zip(whole, self.region.groups * len(self.sections), strict=True):
            self.ranks.scatter_regions(w, g.bounds)

    def outer_step(self, round: int) -> Any:
        self.deliver()
        self.ranks.share((OUTER, round))
        steps = self.math.outer_steps
        result = _whole_norms(self.ranks, self.math, self.math.outer_step(round))
        if result.applied or self.math.outer_steps != steps:  # (NoLoCo's local-only step moves φ too)
            self._digests = None
        return result

    def flush(self) -> Any:
        """(CO2) Land the reduce in flight on every rank, launching nothing."""
        self.deliver()
        self.ranks.share((FLUSH,))
        result = self.math.flush()
        if result is not None and result.applied:
            self._digests = None
        return result

    def state_dict(self) -> dict[str, Any]:
        """This rank's region of the outer state (every rank saves its own: see
        ``region_state``). No collective: a state loaded but not yet told to the other
        ranks is whole here, and saved whole (without a reduce it still has to apply, as a
        one-process CO2 member's checkpoint is)."""
        if self._pending is not None:
            whole, outer_steps, _, _, replicated = self._pending
            state: dict[str, Any] = {self.steps_key: outer_steps,
                                     **{name: t.clone() for name, t in zip(self.replicated, replicated, strict=True)}}
            G = len(self.region.groups)
            for s, name in enumerate(self.sections):  # in the parameters' order, as one process saves it
                views = [v for w, g in zip(whole[s * G:(s + 1) * G], self.region.groups, strict=True)
                         for v in shaped_views(w.clone(), g.shapes)]
                ordered: list[Any] = [None] * len(views)
                for i, v in zip(self.region.order, views, strict=True):
                    ordered[i] = v
                state[name] = ordered
            return state
        return region_state(self.region, self.math)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A region saved by this rank (``state_dict``; every rank loads its own), or a whole
        state (a one-process member's, a checkpoint from before the split), whose regions go
        out to the other ranks when they next listen."""
        if "region" in state:
            load_region_state(self.region, self.math, state)
            self._pending = None
            self._digests = None
            return
        steps = state[self.steps_key]
        for name in self.replicated:
            if name not in state:
                raise ValueError(f"this outer state holds no {name!r}: it was saved with other settings")
        self.load_synchronized([*(state[name][i] for name in self.sections for i in self.region.order),
                                *(state[name] for name in self.replicated)],
                               int(steps) if isinstance(steps, int | float) else steps, reset_params=False)

    def close(self) -> None:
        _close_math(self.math)
        for server in (self._parts, self.results):
            if server is not None:
                server.close()


def region_state(region: RegionWeights, math: Any) -> dict[str, Any]:
    """A rank's region of the outer state, for its own checkpoint file: the region's φ and
    momentum (copies), and which region of how many it is."""
    return {**math.state_dict(), "region": {"rank": region.ranks.rank, "ranks": region.ranks.size,
                                            "numel": region.numel}}


def load_region_state(region: RegionWeights, math: Any, state: dict[str, Any]) -> None:
    saved = state["region"]
    mine = {"rank": region.ranks.rank, "ranks": region.ranks.size, "numel": region.numel}
    if {k: int(saved[k]) for k in mine} != mine:
        raise ValueError(f"the outer state saved by rank {saved['rank']} of {saved['ranks']} ({saved['numel']} "
                         f"weights) does not fit rank {mine['rank']} of {mine['ranks']} ({mine['numel']} weights)")
    math.load_state_dict({k: v for k, v in state.items() if k != "region"})


def _stream_digests(region: RegionWeights, math: Any, shapes: list[tuple[int, ...]]) -> tuple[str, str]:
    """(weights, whole state) digests of the member's φ and the rest of its state, every
    rank's regions passing through the leader one at a time, then the replicated sections
    (followers: their part of it, with no shapes; ("", ""))."""
    replicated = _replicated_tensors(math)
    held = _per_weight(math)
    sections = len(held) // len(region.groups)
    specs = [(torch.float32, s) for s in shapes * sections] + [(t.dtype, tuple(t.shape)) for t in replicated]
    stream = StreamHash(specs, prefix=len(shapes)) if region.ranks.leads else None
    # φ's regions group by group, then the rest's, section by section
    for t, g in zip(held, region.groups * sections, strict=True):
        region.ranks.stream_regions(t, g.bounds, stream.update if stream is not None else None)
    if stream is None:
        return "", ""
    for t in replicated:
        stream.update(t)
    return stream.digests()


def _replicated(math: Any) -> tuple[str, ...]:
    """The names of the math's state about the whole model (the same on every rank; CO2's
    gap statistics), which follow its per-weight sections in ``synchronized_tensors``."""
    return tuple(getattr(math, "replicated_sections", ()))


def _replicated_tensors(math: Any) -> list[torch.Tensor]:
    n = len(_replicated(math))
    return math.synchronized_tensors()[-n:] if n else []


def _per_weight(math: Any) -> list[torch.Tensor]:
    """The math's state kept per weight: its region of each section (the rest replicated)."""
    held = math.synchronized_tensors()
    return held[:len(held) - len(_replicated(math))]


def _served(math: Any, leads: bool) -> list[torch.Tensor]:
    """A rank's part of a published state (1-D tensors, one per section): its regions, and
    the replicated sections whole from the leader (empty from the other ranks, so that the
    parts put together hold them once)."""
    return [*_per_weight(math), *(t.reshape(-1) if leads else t.new_empty(0) for t in _replicated_tensors(math))]


def _published_replicated(parts: StateServer | None, math: Any, round: int) -> list[torch.Tensor]:
    """(the leader's) The replicated sections of the state it published at ``round``."""
    replicated = _replicated_tensors(math)
    snap = parts.published(round) if parts is not None and replicated else None
    if snap is None:
        return []
    return [t.reshape(m.shape) for t, m in zip(snap.tensors[-len(replicated):], replicated, strict=True)]


def _measure_whole_tensors(region: RegionWeights, math: Any) -> None:
    """Math whose update reads norms of the model's whole tensors (CO2's gap-aware penalty)
    learns where its region holds pieces of them and sums their squares over the ranks."""
    measure = getattr(math, "measure_whole_tensors", None)
    if measure is None:
        return
    r = region.ranks.rank
    pieces: list[list[tuple[int, int, int]]] = [[] for _ in region.groups]
    for i in range(len(region.params)):
        g, _, per_rank = region.pieces[i]
        a, b = per_rank[r]
        if a < b:
            lo = region.groups[g].lo
            pieces[g].append((i, a - lo, b - lo))
    measure(WholeTensors(len(region.params), pieces, region.ranks.summed))


def _whole_norms(ranks: Ranks, math: Any, result: Any) -> Any:
    """An outer step's norms over the whole member (the math's ``NORMS``, NoLoCo's drift:
    every rank's math measures its own region): summed in squares over the ranks, on every
    rank at once."""
    names = getattr(math, "NORMS", ())
    if names:
        squares = ranks.summed([float(result.extra[k]) ** 2 for k in names])
        result.extra.update({k: s ** 0.5 for k, s in zip(names, squares, strict=True)})
    return result


def _reads_model(math: Any) -> bool:
    """Math whose state lives in the model and its optimizer (DDP's weights and moments:
    region_ddp.py), read into its regions before every publication."""
    return hasattr(math, "read_model")


def _read_model(math: Any) -> None:
    if _reads_model(math):
        math.read_model()  # (a collective: every rank at the same point)


def _close_math(math: Any) -> None:
    close = getattr(math, "close", None)  # (CO2's background reduce)
    if close is not None:
        close()


class RegionResults:
    """This rank's part of the means its reduces landed (CO2), served from its own endpoint
    (kind CO2_RESULT_PART) like its part of the state; the leader hashes the whole mean as
    the ranks' regions pass through it one at a time."""

    def __init__(self, region: RegionWeights):
        self.region = region
        self.server: StateServer | None = None  # opened with the first mean to serve

    def publish(self, round: int, reduce: ReduceResult, transport: Any) -> str | None:
        """Serve this rank's region of reduce ``round``'s mean (every rank at the same point:
        a collective); the leader gets the hash of the whole, None (every rank) for a
        reduce that failed. Called before the next reduce starts: the mean is a view of the
        buffer that reduce reuses."""
        if reduce.tensors is None:
            return None
        if self.server is None:
            self.server = StateServer(transport, kind=CO2_RESULT_PART, keep=RESULTS_KEPT, hashed=False)
        mine = flat_of(reduce.tensors)
        self.server.publish(round, [mine], {})
        shapes = [(p.numel(),) for p in self.region.params]
        stream = StreamHash([(torch.float32, s) for s in shapes]) if self.region.ranks.leads else None
        (whole,) = self.region.groups  # (CO2's: one group of every parameter)
        self.region.ranks.stream_regions(mine, whole.bounds, stream.update if stream is not None else None)
        return stream.digests()[1] if stream is not None else ""

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _restore_part(parts: StateServer | None, math: Any, round: int, outer_steps: Any,
                  replicated: list[torch.Tensor]) -> None:
    """Back to this rank's part of the state published at ``round``, with the replicated
    sections of it the leader served."""
    snap = parts.published(round) if parts is not None else None
    if snap is None:
        raise RuntimeError(f"the part of round {round}'s state this rank served is no longer kept")
    regions = snap.tensors[:len(snap.tensors) - len(replicated)]
    math.load_synchronized([*regions, *replicated], outer_steps, reset_params=True)


class _PendingRegions:
    """A mean this member must apply at its next outer step (CO2, after adopting a state
    whose source had a reduce in flight), each rank its region of it: the leader fetches
    the whole mean and hands the regions out when its math asks (``take``), every rank at
    the same point of the same outer step."""

    def __init__(self, ranks: Ranks, bounds: list[int], fetch: Callable[[], ReduceResult] | None = None):
        self.ranks, self.bounds, self.fetch = ranks, bounds, fetch

    def take(self) -> ReduceResult:
        whole = self.fetch() if self.fetch is not None else None  # (the leader's)
        ok, group_size, members = self.ranks.share(
            None if whole is None else (whole.tensors is not None, whole.group_size, whole.members))
        if not ok:
            return ReduceResult(None, group_size, tuple(members))
        region = self.ranks.scatter_regions(flat_of(whole.tensors) if whole is not None else None, self.bounds)
        return ReduceResult([region], group_size, tuple(members))


class RegionCommunicator:
    """A follower rank's communicator: the mean of its region as its lane averaged it in the
    round the leader committed (None where the round was not). An all-reduce's group size
    is the leader's to report (0 here); a gossip's is the group's, which NoLoCo's math reads."""

    def __init__(self, lane: RankLane):
        self.lane = lane

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        return self.group_mean(tensors, round)

    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        out, group_size = self.lane.reduce(round, flat_of(tensors))
        if out is None:
            return ReduceResult(None, 1)
        return ReduceResult(unflatten(out, tensors), group_size)


class SplitFollower:
    """A follower rank's side of ``SplitOuterState``: the same outer math over its own
    region, run as the leader says, and its part of every published state (and CO2's
    landed means), served from its own endpoint."""

    def __init__(self, region: RegionWeights, lane: RankLane, inner_optimizer: Any = None):
        self.region = region
        self.ranks = region.ranks
        math_type, settings, serves_results = self.ranks.share()
        self.math = math_type(region.outer_params, RegionCommunicator(lane), **settings)
        if hasattr(self.math, "bind_model"):  # (DDP's: its state is the model's and the optimizer's)
            self.math.bind_model(region, inner_optimizer)
        _measure_whole_tensors(region, self.math)
        self.endpoint = lane.transport.endpoint
        self._parts = StateServer(lane.transport, kind=STATE_PART, keep=PARTS_KEPT, hashed=False)
        self.results = RegionResults(region) if serves_results else None
        if self.results is not None:  # the leader serves its part at the same point of the outer step
            self.math.on_launch = self._serve_result

    def _serve_result(self, round: int, reduce: ReduceResult | None) -> None:
        if reduce is not None and self.results is not None:
            self.results.publish(round, reduce, self._parts.transport)

    def held_tensors(self) -> list[torch.Tensor]:
        """The outer state this rank keeps for its own region."""
        return self.math.synchronized_tensors()

    @property
    def served_bytes(self) -> int:
        """Bytes of the published copy of its region this rank keeps to serve."""
        return self._parts.held_bytes

    def state_dict(self) -> dict[str, Any]:
        """This rank's region of the outer state, for its own checkpoint."""
        return region_state(self.region, self.math)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_region_state(self.region, self.math, state)

    def serve(self, command: tuple) -> None:
        kind, groups = command[0], self.region.groups
        if kind == OUTER:
            _whole_norms(self.ranks, self.math, self.math.outer_step(command[1]))
        elif kind == AFTER:
            self.math.after_inner_step(command[1])
        elif kind == DRAIN:
            self.math.drain()
        elif kind == FLUSH:
            self.math.flush()
        elif kind == PUBLISH:
            _, round, first, stream = command
            _read_model(self.math)
            self._parts.publish(round, _served(self.math, leads=False), {})
            if first:
                self.ranks.all_gather(self.endpoint)
            if stream:
                _stream_digests(self.region, self.math, [])
        elif kind == HASH:
            _stream_digests(self.region, self.math, [])
        elif kind == RESTORE:
            _restore_part(self._parts, self.math, command[1], command[2], command[3])
        elif kind == LOAD:
            _, outer_steps, reset_params, pending, replicated = command
            regions = [self.ranks.scatter_regions(None, g.bounds) for g in groups * len(self.math.STATE_SECTIONS)]
            extra = {"pending": _PendingRegions(self.ranks, groups[0].bounds).take} if pending else {}
            self.math.load_synchronized([*regions, *replicated], outer_steps, reset_params=reset_params, **extra)
        else:
            raise RuntimeError(f"rank {self.ranks.rank}: the leader asked {kind!r}, which a split outer state "
                               "does not know")

    def serve_step(self) -> None:
        """Streaming DiLoCo's inner step: what the leader asks until it says the step is done."""
        while (command := self.ranks.share())[0] != STEP_DONE:
            self.serve(command)

    def close(self) -> None:
        _close_math(self.math)
        self._parts.close()
        if self.results is not None:
            self.results.close()
