"""The optimizer's Communicator, backed by the real swarm collective."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from optim.communicator import ReduceResult
from protocols.collective import GroupAllReduce, RoundResult


class SwarmCommunicator:
    """Adapts protocols' GroupAllReduce to optim's Communicator; keeps the last round's
    outcome so the daemon can resynchronize and report it."""

    def __init__(self, collective: GroupAllReduce, state_hash: Callable[[], str], weight: float = 1.0,
                 peer_round: Callable[[], int] | None = None):
        self.collective = collective
        self.state_hash = state_hash
        self.weight = weight
        self.peer_round = peer_round
        self.last: RoundResult | None = None

    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        peer_round = self.peer_round() if self.peer_round else None
        result = self.collective.all_reduce(round, tensors, self.weight, self.state_hash(), peer_round)
        self.last = result
        if result.status != "ok":
            return ReduceResult(None, 1)
        return ReduceResult(result.tensors, len(result.group))
