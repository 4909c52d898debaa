"""The loco wire format: one ZeroMQ multipart message per logical message.

Frame layout (this docstring is the one place it is written down)::

    frame 0    signature  when the swarm has a key: the 32-byte keyed BLAKE3 of frames
                          1..n (the swarm's MAC), then the sender's 64-byte Ed25519
                          signature of that MAC; an empty frame when it has none
    frame 1    header     b"LOCO" | u8 version | msgpack map:
                            kind     str    message type (JOIN, PART, STATE, ...)
                            sender   str    node id of the sender
                            pub      bytes  the sender's Ed25519 public key (32 bytes;
                                            empty without a swarm key)
                            session  str    random per-process id (replay protection)
                            seq      int    per-session counter, strictly increasing
                            time     float  sender's wall clock (replay window)
                            round    int    outer round the message belongs to (-1: none)
                            attempt  int    retry attempt within the round
                            to       str    the endpoint the message was sent to (the
                                            receiver drops one addressed elsewhere)
                            meta     map    kind-specific small fields (msgpack types only)
                            tensors  list   [[dtype, shape], ...] one entry per buffer frame
    frame 2+   buffers    raw little-endian tensor bytes, C order, one per tensors entry,
                          sent without copying (zero-copy on both ends for large buffers)

A ROUTER socket prepends the peer's routing identity on receipt; the transport strips
it before calling :func:`decode`. The MAC covers the header and every buffer, so a
buffer cannot be swapped or truncated without detection, and the sender's signature of the
MAC binds all of it to the key named in ``pub`` (which node ids that key may speak for is
the transport's business: protocols/identity.py). Decoding never trusts the
header: every declared size is checked against the frames that actually arrived.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import time
from dataclasses import dataclass, field
from typing import Any

import blake3
import msgpack
import numpy as np
import torch

from .identity import PUBLIC_KEY_BYTES, NodeKey, verify
from .identity import SIGNATURE_BYTES as NODE_SIGNATURE_BYTES

MAGIC = b"LOCO"
VERSION = 3  # 3: the sender signs with its own key (`pub`); 2: the header names its destination (`to`)
SIGNATURE_BYTES = 32  # the swarm MAC
DEFAULT_MAX_MESSAGE_BYTES = 2 << 30  # 2 GiB: larger than any model part we send
MAX_TENSORS = 65_536  # buffers in one message (a state transfer sends one per parameter)
MAX_DIMS = 16
MAX_HEADER_BYTES = 4 << 20  # a pipeline plan for hundreds of nodes fits in far less
MAX_DIM = 1 << 40
PARALLEL_MAC_BYTES = 1 << 20  # from this size on, the MAC is computed on several threads

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class WireError(ValueError):
    """A message that cannot be accepted. The transport drops it and logs the reason."""


class TruncatedMessage(WireError):
    """Fewer frames or fewer bytes than the header declares."""


class OversizedMessage(WireError):
    """More frames or bytes than declared, or more than the receiver accepts."""


class VersionMismatch(WireError):
    """The header's magic or version is not ours."""


class BadSignature(WireError):
    """Missing, unexpected or wrong signature for this swarm's key."""


class MalformedHeader(WireError):
    """The header is not a valid msgpack map with the required fields."""


@dataclass
class Message:
    """One logical message. ``session``/``seq``/``time`` are filled in by :func:`encode`."""

    kind: str
    sender: str = ""
    round: int = -1
    attempt: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)
    session: str = ""
    seq: int = 0
    time: float = 0.0
    to: str = ""  # the endpoint it was sent to: signed, so a message for one node is void at another
    pub: bytes = b""  # the sender's public key, set by decode only when its signature checked out
    received: float = 0.0  # local, never sent: time.monotonic() when a mailbox filed it


_NUMPY_DTYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
    torch.bfloat16: np.int16,  # numpy has no bfloat16: the same two bytes, viewed back by torch
    torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.bool: np.bool_,
}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if t.device.type == "cpu" and not t.requires_grad and t.is_contiguous():
        # the common case in a few calls (a few µs a message matter at 64 KB)
        flat = (t.view(torch.int16) if t.dtype is torch.bfloat16 else t).numpy().reshape(-1)
        return memoryview(flat).cast("B") if flat.size else memoryview(b"")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    # view as bytes: works for every dtype, bfloat16 included (numpy has no bfloat16)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@functools.lru_cache(maxsize=8)
def _mac_key(key: bytes) -> bytes:
    """The swarm key (any length) as the 32-byte key BLAKE3's keyed mode takes."""
    return hashlib.blake2b(key, digest_size=32, person=b"loco-wire-mac").digest()


def _sign(key: bytes, frames: list[memoryview | bytes]) -> bytes:
    # keyed BLAKE3: ~7x the speed of hashlib's BLAKE2b on one core (3.7 vs 0.5 GB/s),
    # and every byte of every message is hashed twice (sender and receiver)
    # large messages are hashed on every core (7.9 vs 4.3 GB/s on 2 cores); for small ones
    # starting threads costs more than it saves
    big = sum(len(f) for f in frames) >= PARALLEL_MAC_BYTES
    h = blake3.blake3(key=_mac_key(key), max_threads=blake3.blake3.AUTO if big else 1)
    for f in frames:
        h.update(len(f).to_bytes(8, "little"))  # length-prefixed: frame boundaries are signed too
        h.update(f)
    return h.digest(SIGNATURE_BYTES)


_NODE_SIGNING_CONTEXT = b"loco-message-v3"


def encode(msg: Message, key: bytes | None = None, signer: NodeKey | None = None) -> list[bytes | memoryview]:
    """Serialize ``msg`` into the frame list documented in this module's docstring; with a
    swarm ``key``, ``signer`` (the sender's own key) signs it too."""
    specs = []
    buffers: list[memoryview] = []
    for t in msg.tensors:
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"dtype {t.dtype} cannot be sent; supported: {sorted(_DTYPES)}")
        specs.append([_DTYPE_NAMES[t.dtype], list(t.shape)])
        buffers.append(_tensor_bytes(t))
    header = MAGIC + bytes([VERSION]) + msgpack.packb(
        {
            "kind": msg.kind,
            "sender": msg.sender,
            "pub": signer.public if key and signer else b"",
            "session": msg.session,
            "seq": msg.seq,
            "time": msg.time or time.time(),
            "round": msg.round,
            "attempt": msg.attempt,
            "to": msg.to,
            "meta": msg.meta,
            "tensors": specs,
        },
        use_bin_type=True,
    )
    body: list[bytes | memoryview] = [header, *buffers]
    signature = b""
    if key:
        signature = _sign(key, body)
        if signer is not None:
            signature += signer.sign(_NODE_SIGNING_CONTEXT + signature)
    return [signature, *body]


def _buffer(frame: Any) -> memoryview:
    # zmq.Frame (copy=False receive) has the buffer protocol: memoryview(frame) is ~0.3 µs,
    # while its `.buffer` property costs ~30 µs the first time per frame
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _int_in(lo: int, hi: int) -> Any:
    # bool is an int subclass in Python: a header with `round: true` is malformed, not round 1
    return lambda v: type(v) is int and lo <= v <= hi


def _str_upto(n: int) -> Any:
    return lambda v: type(v) is str and len(v) <= n


_HEADER_FIELDS = {
    "kind": _str_upto(64), "sender": _str_upto(256), "session": _str_upto(64),
    "pub": lambda v: type(v) is bytes and len(v) in (0, PUBLIC_KEY_BYTES),
    "seq": _int_in(0, 2**63 - 1), "round": _int_in(-1, 2**62), "attempt": _int_in(-1, 2**62),
    "time": lambda v: type(v) in (int, float) and math.isfinite(v),
    "to": _str_upto(512),
    "meta": lambda v: type(v) is dict, "tensors": lambda v: type(v) is list and len(v) <= MAX_TENSORS,
}


def _parse_header(raw: memoryview) -> dict[str, Any]:
    if len(raw) < len(MAGIC) + 1:
        raise TruncatedMessage(f"header is {len(raw)} bytes, shorter than magic+version")
    if bytes(raw[: len(MAGIC)]) != MAGIC:
        raise VersionMismatch("header does not start with the LOCO magic")
    if len(raw) > MAX_HEADER_BYTES:
        raise OversizedMessage(f"header is {len(raw)} bytes, over the limit of {MAX_HEADER_BYTES}")
    version = raw[len(MAGIC)]
    if version != VERSION:
        raise VersionMismatch(f"wire version {version}, this node speaks {VERSION}")
    try:
        header = msgpack.unpackb(raw[len(MAGIC) + 1 :], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MalformedHeader(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise MalformedHeader("header is not a map")
    for name, check in _HEADER_FIELDS.items():
        if not check(header.get(name)):
            raise MalformedHeader(f"header field {name!r} missing, of the wrong type or out of range")
    return header


def _check_spec(spec: Any, index: int) -> tuple[torch.dtype, list[int], int]:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
            and isinstance(spec[1], list)):
        raise MalformedHeader(f"tensor spec {index} is not [dtype, shape]")
    dtype = _DTYPES.get(spec[0])
    if dtype is None:
        raise MalformedHeader(f"tensor {index} has unknown dtype {spec[0]!r}")
    shape = spec[1]
    # every dim is checked before torch sees it: a bool, a negative or a 2**63 dim would make
    # torch raise (or overflow) instead of this node dropping the message with a reason
    if len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise MalformedHeader(f"tensor {index} has an impossible shape {str(shape)[:80]}")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    return dtype, shape, nbytes


def decode(
    frames: list[Any], key: bytes | None = None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> Message:
    """Parse and verify one message (identity frame already stripped).

    Raises a :class:`WireError` subclass naming what is wrong; never returns a partly
    valid message. Tensors are zero-copy views over the received frames.
    """
    if len(frames) < 2:
        raise TruncatedMessage(f"{len(frames)} frame(s); a message has at least signature + header")
    bufs = [_buffer(f) for f in frames]
    total = sum(len(b) for b in bufs)
    if total > max_bytes:
        raise OversizedMessage(f"{total} bytes exceeds this node's limit of {max_bytes}")
    signature, body = bufs[0], bufs[1:]
    if key:
        if len(signature) not in (SIGNATURE_BYTES, SIGNATURE_BYTES + NODE_SIGNATURE_BYTES):
            raise BadSignature("message is unsigned but this swarm requires a key")
        mac = bytes(signature[:SIGNATURE_BYTES])
        if not hmac.compare_digest(mac, _sign(key, body)):
            raise BadSignature("signature does not match this swarm's key")
    elif len(signature):
        raise BadSignature("message is signed but this node has no swarm key")
    header = _parse_header(body[0])
    pub = header["pub"]
    if key and (len(signature) > SIGNATURE_BYTES or pub):
        # only a message the MAC vouches for gets here, so this costs outsiders nothing
        if not verify(pub, bytes(signature[SIGNATURE_BYTES:]), _NODE_SIGNING_CONTEXT + mac):
            raise BadSignature(f"the sender's own signature does not match the key it names ({bytes(pub).hex()[:16]})")
    elif pub:
        raise BadSignature("message names a sender key but this node has no swarm key")
    specs = header["tensors"]
    payload = body[1:]
    if len(payload) < len(specs):
        raise TruncatedMessage(f"header declares {len(specs)} buffers, {len(payload)} arrived")
    if len(payload) > len(specs):
        raise OversizedMessage(f"header declares {len(specs)} buffers, {len(payload)} arrived")
    tensors = []
    for i, (spec, buf) in enumerate(zip(specs, payload, strict=True)):
        dtype, shape, nbytes = _check_spec(spec, i)
        if len(buf) < nbytes:
            raise TruncatedMessage(f"buffer {i} has {len(buf)} bytes, header declares {nbytes}")
        if len(buf) > nbytes:
            raise OversizedMessage(f"buffer {i} has {len(buf)} bytes, header declares {nbytes}")
        try:
            if nbytes == 0:
                tensors.append(torch.empty(shape, dtype=dtype))
            else:
                if buf.readonly:  # e.g. bytes handed in by a caller; zmq frames are writable
                    buf = memoryview(bytearray(buf))
                t = torch.from_numpy(np.frombuffer(buf, dtype=_NUMPY_DTYPES[dtype]))
                tensors.append((t.view(dtype) if dtype is torch.bfloat16 else t).reshape(shape))
        except (RuntimeError, ValueError, TypeError, OverflowError) as exc:  # e.g. strides past int64
            raise MalformedHeader(f"tensor {i} cannot be built: {exc}") from exc
    return Message(
        kind=header["kind"], sender=header["sender"], round=header["round"],
        attempt=header["attempt"], meta=header["meta"], tensors=tensors,
        session=header["session"], seq=header["seq"], time=float(header["time"]), to=header["to"],
        pub=pub,
    )


def message_nbytes(frames: list[Any]) -> int:
    """Bytes a frame list occupies on the wire (payload; ZeroMQ adds a few bytes a frame)."""
    return sum(len(_buffer(f)) for f in frames)
