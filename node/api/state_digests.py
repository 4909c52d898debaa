"""The hash of a split outer state (split_state.py), the one a one-process member computes.

No rank holds the whole state, yet its hash must be that of the whole tensors in order (what
peers compare, whatever their rank counts): every rank's region passes through the leader
one at a time, and the leader streams it into one ``StreamHash``. For a published state that
pass runs on a thread of every rank (``BackgroundDigests``), over a gloo side channel of the
member's ranks, from the private copy of its region each rank serves: the training thread
goes on at once, as a one-process member's does while its snapshot is hashed in the
background (the pass moves and hashes the whole state: for 8M parameters, anchor and
momentum, 64 MB a round). A peer that asks for the state meanwhile waits for the hash.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from loco.protocols.state_sync import Snapshot, StreamHash

if TYPE_CHECKING:
    from .ranks import Ranks
    from .region_weights import WeightGroup


def stream_digests(ranks: Ranks, groups: list[WeightGroup], held: list[torch.Tensor],
                   shapes: list[tuple[int, ...]]) -> tuple[str, str]:
    """(weights, whole state) digests of the member's φ and the rest of its state, every
    rank's regions passing through the leader one at a time over ``ranks`` (``held``: this
    rank's region of every section, group by group; followers: no ``shapes``, and they get
    ("", ""))."""
    sections = len(held) // len(groups)
    stream = StreamHash([(torch.float32, s) for s in shapes * sections], prefix=len(shapes)) \
        if ranks.leads else None
    # φ's regions group by group, then the rest's, section by section
    for t, g in zip(held, groups * sections, strict=True):
        ranks.stream_regions(t, g.bounds, stream.update if stream is not None else None)
    return stream.digests() if stream is not None else ("", "")


class BackgroundDigests:
    """Every rank's thread that streams published states through the leader, over a side
    channel of its own (its collectives never interleave with the training thread's). Made
    by every rank at the same point (a collective), and ``submit`` called by every rank in
    the same order: the leader's future holds the digests, the followers' ("", "")."""

    def __init__(self, ranks: Ranks, groups: list[WeightGroup]):
        self.ranks = ranks.side_channel()
        self.groups = groups
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loco-split-digests")

    def submit(self, part: Snapshot, shapes: list[tuple[int, ...]],
               groups: list[WeightGroup] | None = None) -> Future[tuple[str, str]]:
        """Stream ``part`` (this rank's published copy of its region: no one writes to it
        again; on a GPU, moved to host memory by its own server's thread first) in the
        background. ``groups``: the weight groups ``part`` holds, if not the state's."""
        groups = self.groups if groups is None else groups
        return self._pool.submit(lambda: stream_digests(self.ranks, groups, part.tensors, shapes))

    def close(self) -> None:
        """After the pass under way (every rank's closes at the same point)."""
        self._pool.shutdown(wait=True)


def known(digests: tuple[str, str]) -> Future[tuple[str, str]]:
    """Digests already known, as a finished future."""
    done: Future[tuple[str, str]] = Future()
    done.set_result(digests)
    return done
