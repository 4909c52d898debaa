"""What one outer round produced, as the library hands it to the caller."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundReport:
    """One finished round. Times are seconds and add up to the round's wall time:
    ``compute_s`` (the caller's loop: inner steps and whatever else it did) + ``comm_s``
    (blocked on the network: the outer step, DDP's averages, fragment syncs, waiting for a
    background reduce) + ``publish_s`` (host copy of the synchronized state served to
    joining peers: at the round's end, and within it where DDP publishes after every step
    and Streaming DiLoCo after a fragment lands). Bytes are counted at the socket."""

    round: int
    """The round that finished."""
    next_round: int
    """The round this process is at now (a resync may move it further)."""
    status: str
    """ok | skipped | resync | partial (DDP, Streaming: some steps or fragments unsynced)."""
    reason: str
    group_size: int
    compute_s: float
    comm_s: float
    publish_s: float
    bytes_sent: int
    """Cumulative data-plane bytes sent (and below, received) by this process."""
    bytes_recv: int
    round_bytes: int
    """Bytes sent during this round."""
    sync_bytes: list[int]
    """Bytes this process sent in each sync of the round (the outer step, or each fragment)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Algorithm-specific fields (README: Metrics)."""
    _weights_hash: Callable[[], str] | None = field(default=None, repr=False)

    @property
    def utilization(self) -> float:
        """compute_s over the round's wall time (compute, communication and publish)."""
        wall = self.compute_s + self.comm_s + self.publish_s
        return self.compute_s / wall if wall > 0 else 1.0

    @property
    def weights_hash(self) -> str:
        """Hash of the synchronized weights after the round (φ for outer-step algorithms, the
        weights for DDP): equal on every member of an ok round. May wait for the background
        hash of the published state."""
        return self._weights_hash() if self._weights_hash is not None else ""

    def fields(self) -> dict[str, Any]:
        """The metrics record's fields (without the weights hash, which may still be computing)."""
        return dict(round=self.round, next_round=self.next_round, status=self.status, reason=self.reason,
                    group_size=self.group_size, compute_s=self.compute_s, comm_s=self.comm_s,
                    utilization=self.utilization, publish_s=self.publish_s, bytes_sent=self.bytes_sent,
                    bytes_recv=self.bytes_recv, round_bytes=self.round_bytes, sync_bytes=self.sync_bytes,
                    **self.extra)
