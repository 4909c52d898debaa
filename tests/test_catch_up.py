"""Which state a node adopts when it is not where the swarm is."""

from __future__ import annotations

import pytest

from loco.node.api.catch_up import state_to_adopt
from loco.protocols.membership import PeerInfo


def _peers(**rounds: int) -> list[PeerInfo]:
    return [PeerInfo(id=name, endpoint=f"tcp://{name}", round=r) for name, r in rounds.items()]


@pytest.mark.parametrize("own, rounds, slack, want", [
    (3, {"b": 10, "a": 10}, 0, (10, "a")),           # the swarm moved on: follow it (smallest id)
    (3, {"a": 10, "b": 12}, 0, (10, "a")),           # the round two have reached, from the closest above
    (3, {"a": 1000, "b": 3}, 0, None),               # a lone peer far ahead is not followed
    (0, {"a": 5, "b": 0}, 0, (5, "a")),              # a joiner beside another joiner: round 0 vouches for nothing
    (2, {"a": 7}, 0, (7, "a")),                      # a swarm of two
    (3, {"a": 4, "b": 4}, 1, None),                  # within the algorithm's slack
    (40, {"b": 3, "a": 3, "c": 1}, 0, (3, "a")),     # alone far ahead of a group: rejoin it
    (40, {"a": 3, "b": 39}, 0, None),                # a peer announcing the round before: not alone
    (40, {"a": 3, "b": 2}, 0, None),                 # no group behind, only scattered peers
    (40, {"a": 0, "b": 0}, 0, None),                 # fresh joiners are not a group to go back to
    (5, {}, 0, None),
])
def test_the_state_a_node_adopts(own, rounds, slack, want):
    got = state_to_adopt(own, _peers(**rounds), slack)
    assert (got if got is None else (got[0], got[1].id)) == want
