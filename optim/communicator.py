"""The only way an optimizer reaches other replicas.

Implementations: node.sync.SwarmCommunicator (real swarm over protocols/), and the
in-process fakes in tests/. Optimizers depend on this interface, never on a concrete class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class ReduceResult:
    """``tensors`` is None when the round did not complete: the caller keeps its state."""

    tensors: list[torch.Tensor] | None
    group_size: int


class Communicator(Protocol):
    def all_reduce_mean(self, tensors: Sequence[torch.Tensor], round: int) -> ReduceResult:
        """Average ``tensors`` over this round's group. Every member that gets a result
        gets the same float32 values, bit for bit."""
        ...
