"""Transport over real ZeroMQ sockets on 127.0.0.1 (two nodes in one process)."""

from __future__ import annotations

import time

import pytest
import torch
import zmq

from loco.protocols.transport import Transport
from loco.protocols.wire import Message, encode


@pytest.fixture
def pair():
    a, b = Transport("a"), Transport("b")
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
        raw.send_multipart(encode(Message("AFTER", sender="raw", session="r", seq=1, round=0)))
        assert b.recv("AFTER", 0, timeout_s=30) is not None
    finally:
        raw.close()
    a.send(b.endpoint, Message("STILL", round=0))
    assert b.recv("STILL", 0, timeout_s=30) is not None
    assert sum(b.dropped.values()) == 3


def test_unsigned_and_wrongly_signed_messages_are_dropped():
    keyed = Transport("keyed", key=b"k1")
    plain = Transport("plain")
    wrong = Transport("wrong", key=b"k2")
    good = Transport("good", key=b"k1")
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
    frames = encode(Message("ONCE", sender="a", session="s", seq=1, round=0))
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(b.endpoint)
    try:
        raw.send_multipart(frames)
        raw.send_multipart(frames)  # captured and sent again
        raw.send_multipart(encode(Message("AFTER", sender="a", session="s", seq=2, round=0)))
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
    a = Transport("a", send_timeout_s=1.0)
    try:
        start = time.monotonic()
        a.send("tcp://127.0.0.1:1", Message("X", tensors=[torch.zeros(10)]))
        assert time.monotonic() - start < 5
    finally:
        a.close()
