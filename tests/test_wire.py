"""Wire format: round trips for every dtype and shape, and every kind of rejection."""

from __future__ import annotations

import msgpack
import pytest
import torch

from loco.protocols import wire
from loco.protocols.wire import (
    BadSignature,
    MalformedHeader,
    Message,
    OversizedMessage,
    TruncatedMessage,
    VersionMismatch,
    decode,
    encode,
)

KEY = b"swarm-secret"
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)]


def _tensor(dtype, shape):
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape).to(dtype)


def _writable(frames):
    # what a zmq receive with copy=False hands over: writable buffers
    return [bytearray(bytes(f)) for f in frames]


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_and_shape(dtype, key):
    tensors = [_tensor(dtype, s) for s in SHAPES]
    msg = Message("PART", sender="a", round=3, attempt=1, meta={"part": 2, "x": [1.5, "y"]}, tensors=tensors,
                  session="s1", seq=9)
    out = decode(_writable(encode(msg, key)), key)
    assert (out.kind, out.sender, out.round, out.attempt, out.meta) == ("PART", "a", 3, 1, msg.meta)
    assert (out.session, out.seq) == ("s1", 9)
    for a, b in zip(tensors, out.tensors, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_non_contiguous_tensor_round_trip():
    t = torch.randn(4, 6).t()[1:3]
    out = decode(_writable(encode(Message("X", tensors=[t]))))
    assert torch.equal(out.tensors[0], t)


def test_large_buffers_are_received_without_copy():
    frames = _writable(encode(Message("X", tensors=[torch.randn(1000)])))
    out = decode(frames)
    assert out.tensors[0].data_ptr() == torch.frombuffer(frames[2], dtype=torch.uint8).data_ptr()


def _frames(key=None):
    return _writable(encode(Message("X", sender="a", tensors=[torch.randn(8), torch.ones(3)]), key))


def test_truncated_buffer_rejected():
    frames = _frames()
    frames[2] = frames[2][:-4]
    with pytest.raises(TruncatedMessage, match="buffer 0"):
        decode(frames)


def test_missing_buffer_rejected():
    with pytest.raises(TruncatedMessage, match="declares 2 buffers, 1 arrived"):
        decode(_frames()[:-1])


def test_too_few_frames_rejected():
    with pytest.raises(TruncatedMessage):
        decode([b""])


def test_oversized_buffer_rejected():
    frames = _frames()
    frames[3] = frames[3] + b"\0\0\0\0"
    with pytest.raises(OversizedMessage, match="buffer 1"):
        decode(frames)


def test_extra_frame_rejected():
    with pytest.raises(OversizedMessage):
        decode(_frames() + [bytearray(4)])


def test_message_over_the_size_limit_rejected():
    with pytest.raises(OversizedMessage, match="limit"):
        decode(_frames(), max_bytes=40)


def test_wrong_version_rejected():
    frames = _frames()
    frames[1][4] = wire.VERSION + 1
    with pytest.raises(VersionMismatch, match="version"):
        decode(frames)


def test_wrong_magic_rejected():
    frames = _frames()
    frames[1][:4] = b"NOPE"
    with pytest.raises(VersionMismatch, match="magic"):
        decode(frames)


def test_garbage_header_rejected():
    frames = _frames()
    frames[1] = bytearray(wire.MAGIC + bytes([wire.VERSION]) + b"\xc1\xff\x00")
    with pytest.raises(MalformedHeader):
        decode(frames)


def test_header_with_missing_field_rejected():
    frames = _frames()
    frames[1] = bytearray(wire.MAGIC + bytes([wire.VERSION]) + msgpack.packb({"kind": "X"}))
    with pytest.raises(MalformedHeader, match="sender"):
        decode(frames)


def test_impossible_tensor_spec_rejected():
    header = msgpack.unpackb(bytes(_frames()[1][5:]))
    header["tensors"][0] = ["float32", [-1]]
    frames = _frames()
    frames[1] = bytearray(wire.MAGIC + bytes([wire.VERSION]) + msgpack.packb(header))
    with pytest.raises(MalformedHeader, match="impossible shape"):
        decode(frames)


def test_unknown_dtype_rejected():
    header = msgpack.unpackb(bytes(_frames()[1][5:]))
    header["tensors"][0] = ["complex512", [8]]
    frames = _frames()
    frames[1] = bytearray(wire.MAGIC + bytes([wire.VERSION]) + msgpack.packb(header))
    with pytest.raises(MalformedHeader, match="dtype"):
        decode(frames)


def test_bad_signature_rejected():
    frames = _frames(KEY)
    with pytest.raises(BadSignature, match="does not match"):
        decode(frames, b"another-key")


def test_tampered_buffer_fails_signature():
    frames = _frames(KEY)
    frames[2][0] ^= 0xFF
    with pytest.raises(BadSignature):
        decode(frames, KEY)


def test_unsigned_message_rejected_when_key_required():
    with pytest.raises(BadSignature, match="unsigned"):
        decode(_frames(None), KEY)


def test_signed_message_rejected_without_key():
    with pytest.raises(BadSignature, match="no swarm key"):
        decode(_frames(KEY), None)


def test_the_sender_key_signs_the_whole_message():
    """With a swarm key the sender also signs with its own key: decode hands back the key it
    verified; a signature by another key, a swapped key, or a key without a signature fail."""
    from loco.protocols.identity import NodeKey

    mine, other = NodeKey.generate(), NodeKey.generate()
    msg = Message("X", sender="a", tensors=[torch.randn(8)])
    assert decode(_writable(encode(msg, KEY, mine)), KEY).pub == mine.public
    assert decode(_writable(encode(msg, KEY)), KEY).pub == b""  # MAC only: the transport refuses it
    signed = _writable(encode(msg, KEY, mine))
    forged = _writable(encode(msg, KEY, other))
    forged[0][32:] = signed[0][32:]  # mine's signature under other's key: MAC differs anyway
    with pytest.raises(BadSignature):
        decode(forged, KEY)
    stripped = _writable(encode(msg, KEY, mine))
    del stripped[0][32:]  # names mine's key, carries no signature
    with pytest.raises(BadSignature, match="own signature"):
        decode(stripped, KEY)
    wrong = _writable(encode(msg, KEY, mine))
    wrong[0][40] ^= 0xFF
    with pytest.raises(BadSignature, match="own signature"):
        decode(wrong, KEY)
