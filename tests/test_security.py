"""Secure by default: join tokens, signed DHT records, insecure only when asked for. Real
hivemind DHT nodes and ZeroMQ sockets in one process."""

from __future__ import annotations

import logging

import pytest

import loco
from loco.protocols.membership import Membership, PeerInfo
from loco.protocols.wire import Message
from loco.token import make_token, parse_token
from tests.conftest import wait_until


def test_a_join_token_round_trips_and_a_damaged_one_is_named():
    token = make_token("s3cret", ["/ip4/127.0.0.1/tcp/1/p2p/X"])
    assert parse_token(token) == ("s3cret", ["/ip4/127.0.0.1/tcp/1/p2p/X"])
    with pytest.raises(ValueError, match="damaged"):
        parse_token(token[:-5])
    with pytest.raises(ValueError, match="not a loco join token"):
        parse_token("/ip4/127.0.0.1/tcp/1/p2p/X")


def test_a_new_swarm_makes_a_key_and_only_the_token_joins_it(caplog):
    with loco.Swarm(run_id="sec", node_id="a") as first:
        assert first.key and first.join_token.startswith("loco1.")
        with pytest.raises(ValueError, match="needs its key"):
            loco.Swarm(run_id="sec", initial_peers=first.multiaddrs)
        with loco.Swarm(run_id="sec", node_id="b", join=first.join_token) as second:
            assert second.key == first.key
            wait_until(lambda: [p.id for p in first.peers()] == ["b"], 60, "b in a's view")
    with caplog.at_level(logging.WARNING), loco.Swarm(run_id="open", insecure=True) as open_swarm:
        assert open_swarm.key is None
    assert any("WITHOUT a key" in r.getMessage() for r in caplog.records)


def test_dht_records_without_the_swarm_key_are_ignored():
    """Members see each other; a keyless process and one with another key can write to the
    same DHT (they reach it), but no member ever takes their records for peers."""
    a = Membership("sec", "a", key=b"k", ttl_s=30)
    others = []
    try:
        for node_id, key in (("b", b"k"), ("outsider", None), ("forger", b"other")):
            m = Membership("sec", node_id, initial_peers=a.maddrs, key=key, ttl_s=30)
            others.append(m)
            m.announce(PeerInfo(node_id, f"tcp://127.0.0.1:{len(others)}", round=10**6))
        wait_until(lambda: "b" in [p.id for p in a.peers()], 60, "b in a's view")
        for _ in range(3):  # repeated lookups: the fake records never get in
            assert [p.id for p in a.peers()] == ["b"]
            assert "outsider" not in [p.id for p in others[0].peers()]
    finally:
        for m in [*others, a]:
            m.shutdown()


def test_the_socket_to_a_peer_that_left_is_closed():
    with loco.Swarm(run_id="bye", node_id="a") as a:
        b = loco.Swarm(run_id="bye", node_id="b", join=a.join_token)
        try:
            wait_until(lambda: [p.id for p in a.peers()] == ["b"], 60, "b in a's view")
            assert a.transport.send(b.endpoint, Message("GOSSIP", round=0))
            assert a.transport.open_peer_sockets == 1
        finally:
            b.close()  # writes left=True in the DHT
        wait_until(lambda: not a.peers() and a.transport.open_peer_sockets == 0, 60, "a to close its socket to b")


def test_a_member_cannot_write_another_members_record():
    """Records are signed by their node's own key: a key holder that writes a record under a
    live member's id (its own key), or an unsigned one, is not believed."""
    a = Membership("own", "a", key=b"k", ttl_s=30)
    b = Membership("own", "b", initial_peers=a.maddrs, key=b"k", ttl_s=30)
    forger = Membership("own", "b", initial_peers=a.maddrs, key=b"k", ttl_s=30)  # same id, another key
    try:
        b.announce(PeerInfo("b", "tcp://127.0.0.1:2", round=1))
        wait_until(lambda: [(p.id, p.endpoint) for p in a.peers()] == [("b", "tcp://127.0.0.1:2")], 60, "b in a's view")
        forger.announce(PeerInfo("b", "tcp://evil:1", round=10**6))
        forger.dht.store("own.peers", {"endpoint": "tcp://evil:2", "round": 10**6}, forger._get_time() + 30,
                         subkey="c")  # swarm-signed, but by no node key
        wait_until(lambda: a.peers() is not None and a.ignored.counts["ForeignRecord"] >= 1
                   and a.ignored.counts["UnsignedRecord"] >= 1, 60, "the forged records to reach a")
        for _ in range(3):
            assert all("evil" not in p.endpoint and p.round < 10**6 for p in a.peers())
        b.announce(PeerInfo("b", "tcp://127.0.0.1:2", round=2))  # the real b writes again: seen again
        wait_until(lambda: [(p.id, p.round) for p in a.peers()] == [("b", 2)], 60, "b's own record again")
    finally:
        for m in (forger, b, a):
            m.shutdown()


def test_a_lookup_that_misses_a_record_still_valid_is_unknown_not_empty():
    """A DHT node that stopped answering can make a lookup partial: a peer whose record was
    seen valid until later, missing from the next lookup, means "unknown", not "gone"."""
    from loco.protocols.membership import ViewUnknown

    a = Membership("partial", "a", key=b"k", ttl_s=30)
    b = Membership("partial", "b", initial_peers=a.maddrs, key=b"k", ttl_s=30)
    try:
        a.announce(PeerInfo("a", "tcp://127.0.0.1:1"))
        b.announce(PeerInfo("b", "tcp://127.0.0.1:2"))
        wait_until(lambda: [p.id for p in a.peers(strict=True)] == ["b"], 60, "b in a's view")
        real_get = a.dht.get

        def partial(key, latest=False):
            found = real_get(key, latest=latest)
            del found.value["b"]
            return found

        a.dht.get = partial
        with pytest.raises(ViewUnknown, match="missed records still valid"):
            a.peers(strict=True)
        assert a.peers() == []  # not strict: what was found
    finally:
        for m in (b, a):
            m.shutdown()
