"""DDP across members whose parameters are sharded over their ranks (FSDP2 inside; HSDP
in the field's words), with no rank holding the whole model.

Every inner step, between backward and the optimizer's step, each rank reads its region of
the member's flat gradient out of the FSDP gradient shards (``RegionWeights.read``: one
gradient at a time is whole on the device), averages it with the matching regions of the
other members from its own endpoint (rank_exchange.py: members of any rank count match by
position in the whole vector), and writes the mean back into the gradient shards; a step
whose average did not complete drops every rank's gradients, and the optimizer skips it.

What DDP keeps identical on every replica is the weights and the inner AdamW moments. Each
rank keeps its region of the three (``STATE_SECTIONS``, in the order a one-process member
serves them) in host memory, read from the shards and the optimizer's state before every
publication (``read_model``): the split outer state (split_state.py) then serves them in
parts and hashes them on the leader as the regions pass through it, the hash a one-process
member computes of the same state. A state adopted from a peer (or restored after the
weights went non-finite) lands in the regions first; the weights reach the shards with the
step's news, the moments with ``write_model``, on every rank at the same point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from loco.node.optstate import adam_step, step_count
from loco.protocols.flat import flat_of, shaped_views

if TYPE_CHECKING:
    from .region_weights import RegionWeights


class RegionDataParallel:
    """One rank's region of a sharded DDP member: its gradient average every step, and its
    region of the state DDP synchronizes. Built over ``RegionWeights.outer_params`` (its one
    group) and a communicator (the leader's swarm communicator, a follower's lane), then
    bound to the member's sharded parameters and inner optimizer (``bind_model``)."""

    STATE_SECTIONS = ("weights", "exp_avg", "exp_avg_sq")
    STEPS_KEY = "adam_step"

    def __init__(self, params: list[torch.Tensor], comm: Any):
        (self.weights,) = params  # this rank's region of the flat weights
        self.comm = comm
        self.exp_avg = torch.zeros_like(self.weights)
        self.exp_avg_sq = torch.zeros_like(self.weights)
        self.grads = torch.zeros_like(self.weights)
        self.adam_step = 0
        self.last_group_size = 0
        self.region: RegionWeights | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        # a loaded state the shards and the optimizer do not hold yet: the regions are the truth
        self.model_behind = False

    def bind_model(self, region: RegionWeights, optimizer: torch.optim.Optimizer) -> None:
        self.region, self.optimizer = region, optimizer

    def settings(self) -> dict[str, Any]:
        return {}

    @property
    def outer_steps(self) -> int:
        return 0

    def current_adam_step(self) -> int:
        """The inner optimizer's step count of the state this rank holds."""
        return self.adam_step if self.model_behind else adam_step(self.optimizer, self.region.params)

    def synchronized_tensors(self) -> list[torch.Tensor]:
        return [self.weights, self.exp_avg, self.exp_avg_sq]

    def load_synchronized(self, tensors: list[torch.Tensor], outer_steps: Any, reset_params: bool = True) -> None:
        """A state adopted (this rank's region of each section); ``outer_steps``: AdamW's step count."""
        for mine, t in zip(self.synchronized_tensors(), tensors, strict=True):
            mine.copy_(t)
        self.adam_step = int(outer_steps)
        self.model_behind = True

    def state_dict(self) -> dict[str, Any]:
        return {}  # (the caller's checkpoint of the model and its optimizer holds the state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def read_model(self) -> None:
        """(Every rank, before a publication) The weights and the moments from the shards
        into the regions, unless a loaded state has not reached the shards yet."""
        if self.model_behind:
            return
        params = self.region.params
        states = [self.optimizer.state.get(p, {}) for p in params]
        self.region.read(params, [self.weights])
        self.region.read([s.get("exp_avg") for s in states], [self.exp_avg])
        self.region.read([s.get("exp_avg_sq") for s in states], [self.exp_avg_sq])
        self.adam_step = adam_step(self.optimizer, params)

    @torch.no_grad()
    def write_model(self, step: int) -> None:
        """(Every rank, after the weights were scattered) The regions' moments into the
        optimizer's state, at AdamW step ``step``."""
        opt = self.optimizer
        params = self.region.params
        for p in params:
            state = opt.state.get(p) or {}
            if "exp_avg" not in state:
                state = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            state["step"] = step_count(opt, p, step)
            opt.state[p] = state
        self.region.write([opt.state[p]["exp_avg"] for p in params], [self.exp_avg])
        self.region.write([opt.state[p]["exp_avg_sq"] for p in params], [self.exp_avg_sq])
        self.model_behind = False

    @torch.no_grad()
    def sync_gradients(self, sync_id: int) -> bool:
        """(Every rank) Replace the gradient shards by the swarm's mean; False (on every rank):
        the average did not complete, and the gradients are dropped."""
        params = self.region.params
        self.region.read([p.grad for p in params], [self.grads])
        # a member of several ranks sends its region (its lanes cut the whole layout: the
        # parameters' shapes); one of one rank holds the whole vector and sends it in that
        # layout itself (a codec codes it layer by layer: the other members' ranks must agree)
        whole = self.region.ranks.size == 1
        result = self.comm.all_reduce_mean(shaped_views(self.grads, self.region.shapes) if whole else [self.grads],
                                           sync_id)
        self.last_group_size = result.group_size
        if result.tensors is None:
            for p in params:
                p.grad = None
            return False
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.region.write([p.grad for p in params], [flat_of(result.tensors)])
        return True
