"""A stage's replicas kept in sync after each iteration, through optim/: this node's step of
the iteration's gradients, averaged with the other replicas first (sync = every_step:
DataParallel, sent straight to the replicas of the plan or through the group all-reduce),
or stepped locally with a DiLoCo outer step every ``sync_every`` iterations (diloco), or
NoLoCo's gossip with random replicas (noloco). ``compression.*`` applies to what the
replicas exchange."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from loco.optim import DataParallel, DiLoCo, NoLoCo
from loco.options import compressor_for
from loco.protocols.collective import CollectiveTimeouts, GroupAllReduce
from loco.protocols.gossip import GroupExchange
from loco.protocols.membership import Membership, PeerInfo, ViewUnknown
from loco.protocols.messages import ASK, AVG, DECISION, DONE, GOSSIP, JOIN, PART, PAST, ROSTER, SKIP
from loco.protocols.pipeline.plan import REJOINING, Iteration
from loco.protocols.state_sync import tensors_hash
from loco.protocols.transport import Transport

from ..config import Config
from ..direct_sync import DirectCommunicator
from ..staging import StagedCommunicator
from ..sync import GossipCommunicator, SwarmCommunicator
from .stage_state import StageState

# what a replica sync sends (the collective's kinds, the gossip's): the rest of a pipeline
# node's traffic (microbatches, plans, probes) goes on beside it on other threads
SYNC_KINDS = (JOIN, ROSTER, PART, AVG, DONE, DECISION, SKIP, ASK, PAST, GOSSIP)


class ReplicaSync:
    def __init__(self, cfg: Config, state: StageState, transport: Transport, membership: Membership,
                 stop: threading.Event, iteration: Callable[[], int]):
        """Attaches the outer optimizer (diloco / noloco) to ``state``; ``iteration()``: the
        iteration this node is at (NoLoCo's gossip partners are drawn per iteration)."""
        self.cfg, self.p, self.state, self.membership = cfg, cfg.pipeline, state, membership
        self.me = transport.node_id
        self._group: list[PeerInfo] = []  # the replicas this iteration's sync expects
        self._seen: set[str] = set()  # replicas of this stage the DHT has shown this node
        c, o = cfg.collective, cfg.optim
        # a replica still finishing the iteration (waiting out a dead node's microbatches)
        # must be waited for, or the replicas would step apart
        wait = max(c.matchmaking_timeout_s, self.p.iteration_timeout_s + 10)
        timeouts = CollectiveTimeouts(wait, max(c.join_timeout_s, wait + 10), c.allreduce_timeout_s,
                                      c.decision_timeout_s, c.max_attempts)
        # compression.* applies to what the replicas exchange (not to activations and gradients
        # between stages)
        compressor = compressor_for(cfg.compression, cfg.train.seed)
        self.collective: GroupAllReduce | None = None
        if self.p.sync == "diloco" or (self.p.sync == "every_step" and self.p.replica_exchange == "collective"):
            self.collective = GroupAllReduce(transport, self.peers, timeouts, compressor, stop=stop,
                                             max_norm_ratio=c.max_norm_ratio)
        self.grads: DataParallel | None = None
        self._direct: DirectCommunicator | None = None
        if self.p.sync == "every_step":
            # the replicas' states must agree (a joiner is handed the state, not resynced)
            if self.collective is not None:
                self._comm: SwarmCommunicator | DirectCommunicator = SwarmCommunicator(
                    self.collective, lambda: tensors_hash(state.params))
            else:  # the plan names the group: no matchmaking, no leader (see node/direct_sync.py)
                # (a replica whose DHT view lags and leaves out a planned twin still answers and
                # averages it when it writes: the exchange adopts it, so both hear each other)
                exchange = GroupExchange(transport, compressor, stop=stop, live=self._members_in_view)
                self._comm = self._direct = DirectCommunicator(exchange, self.me, self.peers,
                                                               lambda: tensors_hash(state.params), wait,
                                                               c.max_norm_ratio)
            self.grads = DataParallel(state.params, self._staged(self._comm))
        # diloco: the microbatches this replica trained on since its last applied outer step,
        # its weight in the replicas' average (the scheduler may give a stage's replicas
        # uneven shares: 1 and 3 microbatches an iteration measured; equal weights then gave
        # a quarter of the data half the say)
        self._outer_comm: SwarmCommunicator | None = None
        self._microbatches = 0
        if self.p.sync == "diloco":
            self._outer_comm = SwarmCommunicator(self.collective, lambda: "")
            state.outer = DiLoCo(state.params, self._staged(self._outer_comm), o.outer_lr, o.outer_momentum,
                                 o.nesterov)
        elif self.p.sync == "noloco":  # gossip with random replicas of the stage, no all-reduce
            n = o.noloco
            gossip = GroupExchange(transport, compressor, stop=stop, live=lambda: [p.id for p in membership.peers()])
            comm = GossipCommunicator(gossip, self.me, self.peers, n.group_size, n.exchange_timeout_s,
                                      cfg.train.seed, peer_round=iteration)
            state.outer = NoLoCo(state.params, self._staged(comm), n.alpha, n.beta, n.gamma)

    def _staged(self, comm):
        """GPU tensors reach the network through reused pinned host buffers."""
        return StagedCommunicator(comm, self.state.device) if self.state.device.type == "cuda" else comm

    def _members_in_view(self) -> list[str]:
        """Replicas a direct exchange still waits for: those the DHT shows at the endpoint
        the plan has for them (another one: the planned process died and a new one took its
        id, joining), less those that stepped out to be handed the state again (REJOINING).
        One that shows JOINING is waited for: a replica planned into iteration 0 of a fresh
        swarm says JOINING until it reads that plan, seconds later on a busy machine (not
        waiting for it, its twin stepped alone and the two went apart at once)."""
        planned = {p.id: p.endpoint for p in self._group}
        return [p.id for p in self.membership.peers()
                if p.round != REJOINING and planned.get(p.id, p.endpoint) == p.endpoint]

    @property
    def behind(self) -> bool:
        """The last direct exchange showed this replica's weights apart from those of the
        smallest replica it heard from: it must be handed a replica's state again."""
        return self._direct is not None and self._direct.behind

    def peers(self) -> list[PeerInfo]:
        """The replicas this iteration's sync expects, less those that left the DHT since
        (the collective stops waiting for them). A failed lookup says nobody left; nor does
        the absence of a replica the DHT never showed this node (see :meth:`expect`)."""
        try:
            live = {(p.id, p.endpoint) for p in self.membership.peers(strict=True)}
        except ViewUnknown:
            return list(self._group)
        return [p for p in self._group if self._may_be_live(p.id, (p.id, p.endpoint) in live)]

    def expect(self, work: Iteration) -> None:
        """The stage's replicas this iteration's sync waits for: those in the plan that the
        DHT still shows (their records lag behind iterations shorter than a refresh, so the
        DHT cannot say more), and those it has not shown this node yet: a replica that just
        joined (iteration 0 of a fresh swarm) may be in the leader's view and the plan
        before its record reaches this node, and a replica that averaged alone in the
        meantime would step apart from it for good. A failed lookup removes nobody:
        otherwise each replica would average alone and skip the iteration's sync."""
        planned = [PeerInfo(n, work.endpoints[n], work.number, s) for n, s in work.stages.items()
                   if s == self.state.stage and n != self.me]
        try:
            live = {p.id for p in self.membership.peers(strict=True)}
        except ViewUnknown:
            live = {p.id for p in planned}
        self._seen |= {p.id for p in planned} & live
        # a replica back in the plan after iterations out of it (a joiner admitted, perhaps
        # planned once before its hand-off failed) was silent for a reason now gone
        if self.collective is not None:
            self.collective.expect({p.id for p in planned} - {p.id for p in self._group})
        self._group = [p for p in planned if self._may_be_live(p.id, p.id in live)]

    def _may_be_live(self, replica: str, in_view: bool) -> bool:
        """A replica counts as live if the DHT shows it, or has never shown it to this node."""
        return in_view or replica not in self._seen

    def _why_not(self) -> str:
        """Why the last every-iteration average did not complete."""
        if isinstance(self._comm, SwarmCommunicator):
            last = self._comm.last
            return f"{last.status}: {last.reason}" if last is not None else "no result"
        return "outliers: " + ", ".join(self._comm.suspects)

    def _lr(self, it: int) -> float:
        o = self.cfg.optim
        return o.inner_lr * min(1.0, (it + 1) / o.warmup_steps) if o.warmup_steps else o.inner_lr

    def step(self, work: Iteration) -> tuple[str, int, str]:
        """Average or apply the iteration's gradients; returns (status, replicas in sync, why
        the sync did not happen: "" when it did)."""
        params, opt = self.state.params, self.state.opt
        self.expect(work)
        count = float(len(work.visited))
        for p in params:  # the gradient over this replica's microbatches, as a mean
            if p.grad is not None and count > 0:
                p.grad.div_(count)
        ran = count > 0  # whether there is a gradient to apply
        group = 1
        status, reason = "ok", ""
        if self.grads is not None:
            # Each replica offers its mean gradient weighted by its microbatch count: the
            # group's weighted average is then the mean over all the group's microbatches,
            # and the outlier rule compares like with like (a replica that ran eight
            # microbatches is not "8x larger" than one that ran one, so not poison). A
            # replica that ran none offers zeros at weight 0; if none ran, every replica
            # keeps its zeros, and a zero average is not stepped (AdamW would still move).
            self._comm.weight = count
            if self.grads.sync_gradients(work.number):
                group = self.grads.last_group_size
                ran = any(bool(p.grad.any()) for p in params)
            else:
                status, ran = "skipped", False  # apply nothing rather than step apart from the others
                reason = self._why_not()
            if self.behind:  # its step would be on weights the others do not hold
                status, ran = "apart", False
                reason = f"weights differ from {min(self._direct.apart)}'s: to be handed the stage state again"
        if ran:
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            for g in opt.param_groups:
                g["lr"] = self._lr(work.number)
            opt.step()
        opt.zero_grad(set_to_none=True)
        outer = self.state.outer
        self._microbatches += len(work.visited)
        if outer is not None and (work.number + 1) % self.p.sync_every == 0:
            if self._outer_comm is not None:
                self._outer_comm.weight = float(self._microbatches)
            result = outer.outer_step(work.number)
            group = result.group_size
            status = "ok" if result.applied else "skipped"
            if result.applied:  # (else the next pseudo-gradient spans these microbatches too)
                self._microbatches = 0
        return status, group, reason
