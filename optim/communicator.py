"""The only way an optimizer reaches other replicas.

Implementations: node.sync (real swarm over protocols/), and the in-process fakes in
tests/. Optimizers depend on these interfaces, never on a concrete class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class ReduceResult:
    """``tensors`` is None when the round did not complete: the caller keeps its state.

    ``members``: who took part (ids, when the communicator knows them); ``detail``: the
    transport-level outcome, opaque to optimizers, for the caller's bookkeeping."""

    tensors: list[torch.Tensor] | None
    group_size: int
    members: tuple[str, ...] = ()
    detail: Any = None


class Communicator(Protocol):
    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int, span: int = 1) -> ReduceResult:
        """Average ``tensors`` over this round's group. Every member that gets a result
        gets the same float32 values, bit for bit. ``span``: how many sync periods the
        contribution covers (a replica whose last syncs failed offers the change since its
        last applied one); a collective that screens outliers allows it that much more."""
        ...


class GroupCommunicator(Protocol):
    def group_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        """Average ``tensors`` within this round's small group (NoLoCo's gossip): the
        communicator picks the group. A partner that does not answer in time is left out;
        alone, the result is the input itself (group_size 1)."""
        ...
