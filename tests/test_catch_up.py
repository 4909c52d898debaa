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


def test_an_unreachable_source_is_back_once_it_answers_a_probe_but_not_for_sending_alone():
    """Real transports: ``a`` could not fetch the states of ``b`` and ``c`` (a partition).
    ``b`` serves state (it answers probes once the link is back): it is a catch-up
    candidate again at once. ``c`` serves none but sends ``a`` a message of its own: a link
    that works one way is not enough, it stays left out; so does a source nobody answers
    for, probed again in the background."""
    from loco.node.api.unreachable import UnreachableSources
    from loco.protocols.state_sync import StateServer, send_probe
    from loco.protocols.transport import Transport
    from tests.conftest import wait_until

    a, b, c, e = (Transport(n) for n in "abce")
    server = StateServer(b)
    try:
        peers = [PeerInfo("b", b.endpoint, 5), PeerInfo("c", c.endpoint, 5), PeerInfo("d", "tcp://127.0.0.1:9", 5)]
        sources = UnreachableSources(a, every_s=0.2)
        for p in peers:
            sources.mark(p, round=4)
        assert "c" not in [p.id for p in sources.reachable(peers, 4)]  # it answers nothing
        send_probe(c, a.endpoint, 0)  # c -> a works (c's probe reaches a); a -> c's state does not
        wait_until(lambda: [p.id for p in sources.reachable(peers, 4)] == ["b"], 20, "b to be back")
        wait_until(lambda: a.last_heard.get("c"), 20, "c's message to arrive")
        assert [p.id for p in sources.reachable(peers, 4)] == ["b"]
        # one that never answers is probed again every every_s (when reachable() is asked,
        # once a round), and stays left out
        probes: list[int] = []
        e.on("STATE_DIGEST_REQ", lambda msg: probes.append(msg.attempt))
        silent = PeerInfo("e", e.endpoint, 5)
        sources.mark(silent, 4)
        wait_until(lambda: sources.reachable([silent], 4) == [] and len(set(probes)) >= 3, 20, "probes again")
    finally:
        server.close()
        for t in (a, b, c, e):
            t.close()
