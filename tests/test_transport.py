"""Transport over real ZeroMQ sockets on 127.0.0.1 (two nodes in one process)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from loco.protocols.identity import NodeKey
from loco.protocols.wire import Message, encode

from .conftest import wait_until
from .transports import open_transport


@pytest.fixture
def pair():
    a, b = open_transport("a"), open_transport("b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_send_and_receive_tensors_with_byte_counts(pair):
    a, b = pair
    t = torch.randn(1000)
    assert a.send(b.endpoint, Message("PING", round=2, meta={"x": 1}, tensors=[t]))
    got = b.recv("PING", 2, timeout_s=30)
    assert got is not None and got.sender == "a" and got.meta == {"x": 1}
    assert torch.equal(got.tensors[0], t)
    assert a.bytes_sent == b.bytes_recv > 4000


def test_recv_times_out_with_none(pair):
    _, b = pair
    start = time.monotonic()
    assert b.recv("NOTHING", 0, timeout_s=0.3) is None
    assert time.monotonic() - start >= 0.29


def test_garbage_frames_are_dropped_and_the_node_keeps_working(pair):
    a, b = pair
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(b.endpoint)
    try:
        raw.send_multipart([b"", b"not a header"])
        raw.send_multipart([b"x"])
        raw.send_multipart([b"", b"LOCO\x01\xff\xff"])
        # same connection, so it is processed after the garbage: no sleep needed
        raw.send_multipart(encode(Message("AFTER", sender="raw", session="r", seq=1, round=0, to=b.endpoint)))
        assert b.recv("AFTER", 0, timeout_s=30) is not None
    finally:
        raw.close()
    a.send(b.endpoint, Message("STILL", round=0))
    assert b.recv("STILL", 0, timeout_s=30) is not None
    assert sum(b.dropped.values()) == 3


def test_unsigned_and_wrongly_signed_messages_are_dropped():
    keyed = open_transport("keyed", key=b"k1")
    plain = open_transport("plain")
    wrong = open_transport("wrong", key=b"k2")
    good = open_transport("good", key=b"k1")
    try:
        plain.send(keyed.endpoint, Message("HELLO", round=0))
        wrong.send(keyed.endpoint, Message("HELLO", round=0))
        assert keyed.recv("HELLO", 0, timeout_s=1.0) is None
        good.send(keyed.endpoint, Message("HELLO", round=0))
        msg = keyed.recv("HELLO", 0, timeout_s=30)
        assert msg is not None and msg.sender == "good"
        assert keyed.dropped["BadSignature"] == 2
    finally:
        for t in (keyed, plain, wrong, good):
            t.close()


def test_replayed_message_is_dropped(pair):
    _, b = pair
    frames = encode(Message("ONCE", sender="a", session="s", seq=1, round=0, to=b.endpoint))
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(b.endpoint)
    try:
        raw.send_multipart(frames)
        raw.send_multipart(frames)  # captured and sent again
        raw.send_multipart(encode(Message("AFTER", sender="a", session="s", seq=2, round=0, to=b.endpoint)))
        assert b.recv("AFTER", 0, timeout_s=30) is not None
    finally:
        raw.close()
    assert len(b.mailbox.take("ONCE", 0, 0, None, time.monotonic(), want=2)) == 1
    assert b.dropped["Replay"] == 1


def test_a_failing_handler_does_not_stop_the_io_thread(pair):
    a, b = pair

    def boom(msg):
        raise RuntimeError("bad request")

    b.on("BOOM", boom)
    a.send(b.endpoint, Message("BOOM"))
    a.send(b.endpoint, Message("AFTER", round=0))
    assert b.recv("AFTER", 0, timeout_s=30) is not None
    assert b.dropped["HandlerError"] == 1


def test_send_to_unreachable_peer_does_not_block():
    a = open_transport("a", send_timeout_s=1.0)
    try:
        start = time.monotonic()
        a.send("tcp://127.0.0.1:1", Message("X", tensors=[torch.zeros(10)]))
        assert time.monotonic() - start < 5
    finally:
        a.close()


def raw_socket(endpoint: str) -> zmq.Socket:
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(endpoint)
    return raw


def test_a_well_formed_message_with_wrong_field_types_is_dropped_by_reason(pair):
    """The meta of every loco kind is checked against its schema before any code reads it."""
    a, b = pair
    hostile = [("DONE", {"ok": True, "missing": 5}), ("PART", {"part": 0, "offset": 0, "codec": {},
                                                              "weight": "abc"}),
               ("JOIN", {"state_hash": "", "weight": "x", "endpoint": a.endpoint}),
               ("JOIN", {"state_hash": "", "weight": float("nan"), "endpoint": a.endpoint}),
               ("ROSTER", {"status": "member", "members": [[1, 2, 3]]}), ("NOT_A_KIND", {})]
    for kind, meta in hostile:
        a.send(b.endpoint, Message(kind, round=0, meta=meta))
    a.send(b.endpoint, Message("AFTER", round=0))
    assert b.recv("AFTER", 0, timeout_s=30) is not None
    assert b.dropped["BadMeta"] == 5 and b.dropped["UnknownKind"] == 1
    assert b.mailbox.held() == (0, 0)


def test_a_message_for_another_node_is_void_here():
    """The signed header names the destination: a captured message cannot be replayed at
    another member of the same swarm."""
    a, b, c = (open_transport(n, key=b"k") for n in "abc")
    try:
        frames = encode(Message("HELLO", sender="a", session="s", seq=1, round=0, to=b.endpoint), b"k", a.node_key)
        raw = raw_socket(c.endpoint)
        try:
            raw.send_multipart(frames)
            raw.send_multipart(encode(Message("AFTER", sender="a", session="s", seq=2, round=0, to=c.endpoint),
                                      b"k", a.node_key))
            assert c.recv("AFTER", 0, timeout_s=30) is not None
        finally:
            raw.close()
        assert c.dropped["WrongDestination"] == 1 and c.recv("HELLO", 0, timeout_s=0) is None
    finally:
        for t in (a, b, c):
            t.close()


def test_messages_from_before_a_restart_and_nan_times_are_replays(pair):
    _, b = pair
    raw = raw_socket(b.endpoint)
    try:
        before = time.time() - 60  # captured a minute ago, when another process had this port
        raw.send_multipart(encode(Message("HELLO", sender="a", session="s", seq=1, round=0, to=b.endpoint,
                                          time=before)))
        raw.send_multipart(encode(Message("HELLO", sender="a", session="t", seq=1, round=0, to=b.endpoint,
                                          time=float("nan"))))
        raw.send_multipart(encode(Message("AFTER", sender="a", session="u", seq=1, round=0, to=b.endpoint)))
        assert b.recv("AFTER", 0, timeout_s=30) is not None
    finally:
        raw.close()
    assert b.dropped["Replay"] + b.dropped["MalformedHeader"] == 2 and b.recv("HELLO", 0, timeout_s=0) is None


def test_a_sender_cannot_fill_the_mailbox():
    a = open_transport("a")
    b = open_transport("b", max_message_bytes=64_000)
    try:
        for i in range(20):  # 20 x 4 kB unread: only what fits in 64 kB is kept
            a.send(b.endpoint, Message("X", round=i, tensors=[torch.zeros(1000)]))
        a.send(b.endpoint, Message("AFTER", round=0))
        assert b.recv("AFTER", 0, timeout_s=30) is not None
        held, nbytes = b.mailbox.held()
        assert nbytes <= 64_000 and held == 16 and b.dropped["MailboxFull"] == 4
        assert b.recv("X", 0, timeout_s=1) is not None  # taking one frees room for the next
        a.send(b.endpoint, Message("X", round=99, tensors=[torch.zeros(1000)]))
        assert b.recv("X", 99, timeout_s=30) is not None
    finally:
        a.close()
        b.close()


def test_a_slow_consumer_holds_bounded_memory_from_many_senders():
    """Back-pressure on a node that does not read: each sender fits under its own limit, but
    together they stop at the mailbox's total; the rest is refused and counted, and reading
    makes room again."""
    senders = [open_transport(f"s{i}") for i in range(4)]
    b = open_transport("b", max_message_bytes=40_000, max_mailbox_bytes=100_000)
    try:
        for i in range(8):  # 4 senders x 8 x 4 kB = 128 kB offered, 32 kB each: under the per-sender limit
            for s in senders:
                s.send(b.endpoint, Message("X", round=i, tensors=[torch.zeros(1000)]))
        for s in senders:
            s.send(b.endpoint, Message("AFTER", round=0))
        for s in senders:
            assert b.mailbox.take("AFTER", 0, 0, [s.node_id], time.monotonic() + 30)
        held, nbytes = b.mailbox.held()
        assert nbytes <= 100_000 and held == 25 and b.dropped["MailboxFull"] == 7
        assert len(b.mailbox.drain("X", 0)) == 4  # reading frees room
        senders[0].send(b.endpoint, Message("X", round=99, tensors=[torch.zeros(1000)]))
        assert b.recv("X", 99, timeout_s=30) is not None
    finally:
        for t in (*senders, b):
            t.close()


def test_a_message_served_on_the_io_thread_and_one_filed_for_the_consumer_are_identical():
    """The two ways a message reaches its reader (a handler on the I/O thread, the mailbox
    read by the training thread) see the same bytes, signed or not."""
    for key in (None, b"k" * 32):
        a, b = open_transport("a", key=key), open_transport("b", key=key)
        served = []
        b.on("PING", served.append)
        try:
            tensors = [torch.randn(70_000), torch.arange(100, dtype=torch.int64), torch.randn(3, 5).half()]
            assert a.send(b.endpoint, Message("PING", round=3, meta={"x": 7}, tensors=tensors))
            assert a.send(b.endpoint, Message("X", round=3, meta={"x": 7}, tensors=tensors))
            filed = b.recv("X", 3, timeout_s=30)
            # one connection, one I/O thread: PING was served before X was filed
            assert filed is not None and len(served) == 1
            for got in (served[0], filed):
                assert got.meta == {"x": 7} and got.sender == "a" and len(got.tensors) == 3
                for sent, recv in zip(tensors, got.tensors, strict=True):
                    assert recv.dtype == sent.dtype and recv.shape == sent.shape
                    assert recv.numpy().tobytes() == sent.numpy().tobytes()
        finally:
            a.close()
            b.close()


def test_unread_messages_expire():
    a, b = open_transport("a"), open_transport("b")
    b.mailbox.ttl_s = 0.2
    try:
        a.send(b.endpoint, Message("X", round=10**6, tensors=[torch.zeros(1000)]))  # a round far ahead
        a.send(b.endpoint, Message("AFTER", round=0))
        assert b.recv("AFTER", 0, timeout_s=30) is not None
        assert b.mailbox.held()[0] == 1
        time.sleep(0.3)  # the expiry is the behaviour under test
        a.send(b.endpoint, Message("AFTER", round=1))  # a sweep runs when a message is filed
        assert b.recv("AFTER", 1, timeout_s=30) is not None
        assert b.mailbox.held() == (0, 0)
    finally:
        a.close()
        b.close()


def test_reply_sockets_are_bounded():
    a = open_transport("a", max_peer_sockets=8)
    try:
        for port in range(20):  # requests naming 20 different reply endpoints
            a.send(f"tcp://127.0.0.1:{port + 1}", Message("X"))
        assert len(a._peers) == 8
    finally:
        a.close()


def test_dropped_messages_are_logged_at_a_bounded_rate(pair, caplog):
    a, b = pair
    raw = raw_socket(b.endpoint)
    try:
        with caplog.at_level("WARNING", logger="loco.protocols.transport"):
            for _ in range(500):
                raw.send_multipart([b"", b"garbage"])
            raw.send_multipart(encode(Message("AFTER", sender="r", session="r", seq=1, round=0, to=b.endpoint)))
            assert b.recv("AFTER", 0, timeout_s=30) is not None
    finally:
        raw.close()
    assert b.dropped["TruncatedMessage"] + b.dropped["VersionMismatch"] == 500
    assert len(caplog.records) <= 2


def test_a_member_cannot_speak_as_another_live_member():
    """Every member holds the swarm key; only ``a`` holds a's own key. Once ``b`` has heard
    from ``a``, a message claiming to be from ``a`` under any other key (or none) is dropped,
    and it does not touch a's replay state (its session and seq are a's)."""
    a, b = open_transport("a", key=b"k"), open_transport("b", key=b"k")
    insider = NodeKey.generate()
    raw = raw_socket(b.endpoint)
    try:
        assert a.send(b.endpoint, Message("HELLO", round=0))
        assert b.recv("HELLO", 0, timeout_s=30).pub == a.node_key.public
        forged = Message("PART", sender="a", session=a.session, seq=10**9, round=0, to=b.endpoint)
        raw.send_multipart(encode(forged, b"k", insider))  # signed by the insider's own key
        raw.send_multipart(encode(forged, b"k"))  # MAC only: names no key
        assert a.send(b.endpoint, Message("AFTER", round=0))
        assert b.recv("AFTER", 0, timeout_s=30) is not None  # a's next seq is not a replay
        # (the forgeries came over another connection: they may be read after AFTER)
        wait_until(lambda: b.dropped["Impersonation"] == 2, 30, "both forgeries to be dropped")
        assert b.recv("PART", 0, timeout_s=0) is None
        # the insider speaks freely under its own name
        raw.send_multipart(encode(Message("HELLO", sender="x", session="x", seq=1, round=1, to=b.endpoint),
                                  b"k", insider))
        assert b.recv("HELLO", 1, timeout_s=30).sender == "x"
    finally:
        raw.close()
        a.close()
        b.close()


def test_a_node_id_is_free_again_once_its_key_is_stale():
    """A process that restarts without its old key can take its id back, but only after its
    predecessor has gone unheard for the pins' ``stale_s``."""
    from loco.protocols.identity import IdentityPins

    now = [0.0]
    pins = IdentityPins(stale_s=60.0, clock=lambda: now[0])
    old, new = NodeKey.generate(), NodeKey.generate()
    assert pins.check("a", old.public) is None
    assert "bound to key" in pins.check("a", new.public)
    now[0] = 61.0  # a's old key unheard for longer than stale_s
    assert pins.check("a", new.public) is None and pins.bound("a") == new.public
    pins.release("a", old.public)  # a stale key's "left" does not free the new binding
    assert pins.bound("a") == new.public
    pins.release("a", new.public)
    assert pins.bound("a") is None
