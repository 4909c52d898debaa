"""Which peer's state a node adopts when it is not where the swarm is, and whether what it
received can be adopted (pure decisions)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from loco.node.sync import all_finite
from loco.protocols.membership import PeerInfo
from loco.protocols.state_sync import Snapshot


def state_to_adopt(own_round: int, peers: Sequence[PeerInfo], slack: int) -> tuple[int, PeerInfo] | None:
    """The round to move to and the peer to take it from, or None to stay.

    A node takes the state of the swarm when the swarm is further ahead than ``slack``
    rounds. The swarm's round is the highest that two peers have reached — a lone peer
    far ahead (broken, or lying about its round) is not followed — or that of the only
    peer that has trained, when only one has (a swarm of two; a node joining a swarm of
    one while others join too: a peer at round 0 has nothing to vouch for).

    The other way round too: a node that is alone far ahead of the others (it trained on
    while its group was gone, or on its side of a partition, and they are back at an
    older round) is the lone peer they will not follow; it rejoins them instead, or the
    swarm would stay split for good. Among equals the source is the smallest id."""
    trained = sorted((p.round for p in peers if p.round > 0), reverse=True)
    if trained:
        best = trained[1] if len(trained) >= 2 else trained[0]
        if best > own_round + slack:
            source = min((p for p in peers if p.round >= best), key=lambda p: (p.round, p.id))
            return best, source
    # a peer announcing the round before this node's (its DHT record lags by a refresh)
    # may be in this node's group: only a node with no peer that close is alone
    if any(p.round >= own_round - 1 - slack for p in peers):
        return None
    counts = Counter(p.round for p in peers if p.round > 0)
    group = [r for r, n in counts.items() if n >= 2]
    if not group:
        return None
    best = max(group)
    return best, min((p for p in peers if p.round == best), key=lambda p: p.id)


def unusable_state(snap: Snapshot, algorithm: str) -> str | None:
    """Why a peer's state cannot be adopted as it came (None: it can be, so far)."""
    if not all_finite(snap.tensors):
        return "the state holds NaN/Inf"
    if snap.meta.get("algorithm", algorithm) != algorithm:
        return f"peer runs {snap.meta.get('algorithm')!r}, this process {algorithm!r}"
    return None


def state_position(snap: Snapshot, inner_steps: int) -> tuple[int, int]:
    """The (round, step in the round) a peer's state claims; ValueError if impossible."""
    new_round = int(snap.meta.get("round", snap.round))
    new_step = int(snap.meta.get("round_step", 0))
    if not (0 <= new_step <= inner_steps and new_round >= 0):
        raise ValueError(f"round {new_round}, step {new_step} are impossible")
    return new_round, new_step
