"""The pipeline's protocol as every node applies it, apart from any node's state: the message
kinds, what a valid PLAN and a valid microbatch task are, who leads an iteration and who
takes part in it (pure functions of the last plan and the live roster), and the
bookkeeping of one node's share of an iteration.

A plan is a map (it travels as a message's meta)::

    paths      one path of node ids per microbatch (head and tail: the same stage-0 node)
    eval       validation paths (one replica of every stage, in order)
    endpoints  node id -> ZeroMQ endpoint, for everyone the plan names
    stages     node id -> stage, for the members of this iteration
    joins      joining node -> the member replica that hands it its stage's state after
               this iteration ("": none is alive; it brings its own and takes part at once)
    last       the last iteration of the run
    val_loss   the leader's latest validation loss
"""

from __future__ import annotations

from typing import Any

import torch

from ..membership import PeerInfo
from ..messages import PP_ASSIGN, PP_BWD, PP_DROP, PP_FINAL, PP_FWD, PP_PLAN, PP_STATE
from ..wire import Message

PLAN, FWD, BWD, DROP = PP_PLAN, PP_FWD, PP_BWD, PP_DROP
FINAL, ASSIGN, HANDOFF = PP_FINAL, PP_ASSIGN, PP_STATE
QUEUED = (PLAN, FWD, BWD, DROP, FINAL, ASSIGN, HANDOFF)  # what a node's I/O thread queues for its loop

# the round a pipeline node's DHT record shows while it is not a member: joining, or joining
# again after the replica that was to hand it its stage's state left before sending it; or
# still starting (timing its passes, probing its links): not admitted to a running pipeline
# until it waits for a plan, since an admitted node is on the next iteration's paths
JOINING, REJOINING, STARTING = -1, -2, -3


def leader_of(prev: dict[str, Any] | None, roster: list[PeerInfo]) -> str | None:
    """The smallest live stage-0 member of the last plan ``prev`` (of a fresh swarm: the
    smallest live stage-0 node). A node is the one of the plan if its endpoint is the
    plan's, so a restarted node is not taken for the one that died."""
    alive = {p.id: p for p in roster}
    if prev is None:
        ids = [p.id for p in alive.values() if p.stage == 0]
    else:
        ids = [n for n, s in prev["stages"].items()
               if s == 0 and n in alive and alive[n].endpoint == prev["endpoints"].get(n)]
    return min(ids) if ids else None


def admit(prev: dict[str, Any] | None, roster: list[PeerInfo]) -> tuple[list[PeerInfo], dict[str, str]]:
    """Who takes part in the iteration after plan ``prev``, and who is admitted during it.

    Members: the live nodes of the last plan (same endpoint) and those it admitted. Any
    other live node joins: a replica of its stage sends it its state after this iteration
    and it takes part in the next; if its stage has no member, it brings its own state
    (checkpoint or seed) and takes part at once. A node admitted earlier whose hand-off
    source left before sending says so (REJOINING) and joins again, from another replica;
    until its record shows it a member, one that ``prev`` admitted from a live replica is
    receiving that replica's state (admitting it once more would take it out again). A node
    still STARTING is admitted once it waits for a plan."""
    if prev is None:  # iteration 0 of a fresh swarm: everyone who is here
        return roster, {}
    was, endpoints, admitted = prev["stages"], prev["endpoints"], prev.get("joins", {})
    live = {p.id for p in roster}

    def member(p: PeerInfo) -> bool:
        if endpoints.get(p.id) != p.endpoint:
            return False
        if p.round == REJOINING:
            return admitted.get(p.id, "") in live
        return p.id in was or bool(admitted.get(p.id))

    members = [p for p in roster if member(p)]
    ids = {p.id for p in members}
    joins = {}
    for p in roster:
        if p.id not in ids and p.round != STARTING:
            replicas = sorted(m.id for m in members if m.stage == p.stage)
            joins[p.id] = replicas[0] if replicas else ""
    members += [p for p in roster if joins.get(p.id) == ""]
    return sorted(members, key=lambda p: p.id), joins


def check_plan(meta: dict[str, Any]) -> str | None:
    """What is wrong with a PLAN's meta (None: nothing). A bad plan is dropped, not obeyed."""
    paths, evals = meta.get("paths"), meta.get("eval", [])
    endpoints, stages = meta.get("endpoints"), meta.get("stages", {})
    if not isinstance(endpoints, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in endpoints.items()):
        return "endpoints is not a map of node id to endpoint"
    if not isinstance(stages, dict) or not all(isinstance(v, int) and k in endpoints for k, v in stages.items()):
        return "stages is not a map of node id (with an endpoint) to stage"
    joins = meta.get("joins", {})
    if not isinstance(joins, dict) or not all(
            isinstance(k, str) and k in endpoints and isinstance(v, str) and (v == "" or v in endpoints)
            for k, v in joins.items()):
        return "joins is not a map of joining node to a source node of the plan"
    for name, group in (("paths", paths), ("eval", evals)):
        if not isinstance(group, list):
            return f"{name} is not a list"
        for path in group:
            if not (isinstance(path, list) and len(path) >= 3 and path[0] == path[-1]
                    and all(isinstance(n, str) and n in endpoints for n in path)):
                return f"{name} holds a malformed path {str(path)[:80]}"
    return None


def check_task(work: Iteration, msg: Message, activation: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> str | None:
    """What is wrong with a FWD/BWD/DROP for this node in ``work`` (None: nothing); FWD and
    BWD carry one tensor of shape ``activation`` in the pipeline's wire ``dtype``."""
    m, is_eval = msg.meta.get("mb"), msg.meta.get("eval")
    if not isinstance(m, int) or isinstance(m, bool) or not isinstance(is_eval, bool):
        return "mb/eval missing or of the wrong type"
    group = work.eval_paths if is_eval else work.paths
    if not 0 <= m < len(group):
        return f"no microbatch {m} in this iteration"
    path, k = group[m], msg.meta.get("hop")
    if msg.kind == DROP:  # (from a node on the microbatch's path: the one that gave it up)
        return None if msg.sender in path else f"{msg.sender or '?'} is not on the path of microbatch {m}"
    # a forward arrives at hops 1..end (the head starts it), a backward at hops 0..end-1
    lo, hi = (1, len(path) - 1) if msg.kind == FWD else (0, len(path) - 2)
    if not isinstance(k, int) or isinstance(k, bool) or not lo <= k <= hi:
        return f"hop {k!r} is not a {msg.kind} hop of microbatch {m}"
    if path[k] != work.me:
        return f"hop {k} of microbatch {m} is {path[k]}, not this node"
    if msg.kind == BWD and is_eval:
        return "a backward pass for a validation microbatch"
    # a task comes from the hop before (forward) or after (backward): one from anyone else
    # follows another plan of this iteration, or is forged
    sender = path[k - 1] if msg.kind == FWD else path[k + 1]
    if msg.sender != sender:
        return f"hop {k} of microbatch {m} comes from {sender}, not {msg.sender or '?'}"
    if len(msg.tensors) != 1 or msg.tensors[0].dtype != dtype or tuple(msg.tensors[0].shape) != activation:
        got = [(str(t.dtype), tuple(t.shape)) for t in msg.tensors]
        return f"expected one {str(dtype).removeprefix('torch.')} tensor of shape {activation}, got {got}"
    return None


class Iteration:
    """This node's share of one iteration's plan, and what it has done of it."""

    def __init__(self, me: str, number: int, meta: dict[str, Any]):
        self.me = me
        self.number = number
        self.paths: list[list[str]] = meta["paths"]
        self.eval_paths: list[list[str]] = meta.get("eval", [])
        self.endpoints: dict[str, str] = meta["endpoints"]
        self.meta = meta
        self.stages: dict[str, int] = {n: int(s) for n, s in meta.get("stages", {}).items()}
        # nodes admitted by this plan: {joiner: the replica that sends it its stage state
        # after this iteration ("": none, it brings its own and takes part at once)}
        self.joins: dict[str, str] = dict(meta.get("joins", {}))
        self.last = bool(meta.get("last", False))
        self.val_loss = meta.get("val_loss")
        self.remaining: dict[tuple[int, bool], int] = {}  # tasks left here, per (microbatch, eval)
        self.launch: list[tuple[int, bool]] = []  # (microbatch, eval) this node starts
        for is_eval, paths in ((False, self.paths), (True, self.eval_paths)):
            for m, path in enumerate(paths):
                # train: the head finishes with its backward; the tail (same node) computes
                # the loss and its backward in one go; a middle node has a forward and a
                # backward. eval: one forward per visit after the head.
                tasks = sum((1 if k in (0, len(path) - 1) else 2) if not is_eval else int(k > 0)
                            for k, n in enumerate(path) if n == me)
                if tasks:
                    self.remaining[(m, is_eval)] = tasks
                if path[0] == me:
                    self.launch.append((m, is_eval))
        self.owned = list(self.launch)  # (launch is consumed as microbatches start)
        self.abandoned: set[tuple[int, bool]] = set()
        self.losses: list[float] = []
        self.val_losses: list[float] = []
        self.visited: list[int] = []  # microbatches whose backward pass ran here
        self.stash: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.targets: dict[tuple[int, bool], torch.Tensor] = {}
        self.deferred: list[Message] = []  # forwards waiting for a free memory slot

    @property
    def todo(self) -> int:
        return sum(self.remaining.values())

    def path(self, m: int, is_eval: bool) -> list[str]:
        return (self.eval_paths if is_eval else self.paths)[m]

    def done_one(self, m: int, is_eval: bool) -> None:
        key = (m, is_eval)
        self.remaining[key] -= 1
        if not self.remaining[key]:
            del self.remaining[key]

    def abandon(self, m: int, is_eval: bool) -> list[str]:
        """Give up microbatch ``m`` here; returns the other nodes of its path."""
        key = (m, is_eval)
        self.abandoned.add(key)
        self.remaining.pop(key, None)
        self.targets.pop(key, None)
        if not is_eval:
            for k in [k for k in self.stash if k[0] == m]:
                del self.stash[k]
        self.launch = [x for x in self.launch if x != key]
        self.deferred = [d for d in self.deferred if (int(d.meta["mb"]), bool(d.meta["eval"])) != key]
        return [n for n in dict.fromkeys(self.path(m, is_eval)) if n != self.me]

    def pending_paths(self) -> dict[tuple[int, bool], list[str]]:
        return {key: self.path(*key) for key in self.remaining}
