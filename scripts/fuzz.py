"""Fuzz a node's receive path with hostile frames, then check that it still serves a real peer.

    python scripts/fuzz.py --frames 100000          (make fuzz)

Frames are built from valid messages of every kind loco sends, then mutated: flipped and
truncated bytes, hostile headers (huge, negative, bool and overflowing dims, unknown dtypes,
wrong field types), meta values of the wrong type, extra and missing frames, msgpack bombs.
Each frame goes to a real Transport over a real ZeroMQ socket. At the end a real peer sends
a valid message, which must arrive. Prints frames sent, how many were dropped by reason,
anything that escaped as a crash, the receiver's RSS growth and its log volume.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import resource
import time
from typing import Any

import msgpack
import torch
import zmq

from loco.protocols import messages as kinds
from loco.protocols.transport import Transport
from loco.protocols.wire import MAGIC, VERSION, Message, WireError, decode, encode

HOSTILE_VALUES: list[Any] = [
    None, True, False, -1, 0, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, float("nan"), float("inf"), "",
    "x" * 1000, b"\x00" * 64, [], [[]], {}, {"a": {"b": {"c": []}}}, [0, 2**63], [True, 3], [-1],
    [2**40, 2**40, 2**40], 3.5, "float32",
]


def valid_messages(endpoint: str) -> list[Message]:
    """One realistic message of every kind (the meta each sender writes)."""
    vec = [torch.randn(64)]
    codec = {"pieces": [[1, 0, {}]], "span": [0, 64]}
    member = [["p0", endpoint, 1.0], ["p1", endpoint, 1.0]]
    state = {"round": 3, "hash": "ab" * 8, "meta": {"outer_steps": 3, "algorithm": "diloco"}}
    return [
        Message(kinds.JOIN, round=3, meta={"state_hash": "ab", "weight": 1.0, "endpoint": endpoint}),
        Message(kinds.ROSTER, round=3, meta={"status": "member", "members": member}),
        Message(kinds.PART, round=3, meta={"part": 1, "offset": 0, "codec": codec, "weight": 1.0}, tensors=vec),
        Message(kinds.AVG, round=3, meta={"part": 1, "offset": 0, "codec": codec}, tensors=vec),
        Message(kinds.DONE, round=3, meta={"ok": False, "missing": ["p1"]}),
        Message(kinds.DECISION, round=3, meta={"decision": "retry", "status": "retry", "members": member}),
        Message(kinds.GOSSIP, round=3, meta={"endpoint": endpoint, "group": ["p0", "p1"], "codec": codec,
                                             "numel": 64}, tensors=vec),
        Message(f"{kinds.STATE}_REQ", attempt=7, meta={"min_round": 0, "endpoint": endpoint}),
        Message(kinds.STATE, attempt=7, meta=state, tensors=vec),
        Message(kinds.PP_FWD, round=2, meta={"mb": 0, "hop": 1, "eval": False}, tensors=vec),
        Message(kinds.PP_PLAN, round=2, meta={"paths": [["p0", "p1"]], "eval": [], "endpoints": {"p0": endpoint},
                                              "stages": {"p0": 0}}),
        Message(kinds.PP_PING, round=1, meta={"reply_to": endpoint}, tensors=vec),
    ]


def _header(msg: Message, to: str, seq: int) -> dict[str, Any]:
    return {"kind": msg.kind, "sender": "fuzz", "pub": b"", "session": f"fuzz{seq}", "seq": seq, "time": time.time(),
            "round": msg.round, "attempt": msg.attempt, "to": to, "meta": dict(msg.meta),
            "tensors": [["float32", list(t.shape)] for t in msg.tensors]}


def _pack(header: dict[str, Any]) -> bytes:
    return MAGIC + bytes([VERSION]) + msgpack.packb(header, use_bin_type=True)


def _bomb(rng: random.Random) -> bytes:
    """msgpack that claims far more than it holds, or nests far deeper than any header."""
    choice = rng.randrange(3)
    if choice == 0:
        return MAGIC + bytes([VERSION]) + b"\xdd\xff\xff\xff\xff"  # array32 of 4 G items, then nothing
    if choice == 1:
        return MAGIC + bytes([VERSION]) + b"\x91" * 100_000 + b"\xc0"  # 100k nested arrays
    return MAGIC + bytes([VERSION]) + b"\xdf\xff\xff\xff\xff" + b"\xa1k\xc0" * 10  # map32 of 4 G pairs


def mutate(msg: Message, to: str, seq: int, rng: random.Random) -> list[bytes]:
    """One hostile frame list derived from ``msg``."""
    header = _header(msg, to, seq)
    buffers = [t.numpy().tobytes() for t in msg.tensors]
    how = rng.randrange(9)
    if how == 0:  # hostile value in a header field
        header[rng.choice(list(header))] = rng.choice(HOSTILE_VALUES)
    elif how == 1 and header["meta"]:  # hostile value in a meta field
        header["meta"][rng.choice(list(header["meta"]))] = rng.choice(HOSTILE_VALUES)
    elif how == 2:  # an extra meta field
        header["meta"][rng.choice(["x", "weight", "ok", "__class__"])] = rng.choice(HOSTILE_VALUES)
    elif how == 3:  # hostile tensor specs
        header["tensors"] = [[rng.choice(["float32", "complex128", "", 3, "bool"]),
                              rng.choice(HOSTILE_VALUES)] for _ in range(rng.randrange(1, 4))]
    elif how == 4:  # bytes flipped in the packed header
        raw = bytearray(_pack(header))
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return [b"", bytes(raw), *buffers]
    elif how == 5:  # truncated or padded buffers, missing or extra frames
        buffers = [b[: rng.randrange(len(b) + 1)] + b"\x00" * rng.randrange(3) for b in buffers]
        if rng.random() < 0.5:
            buffers = buffers[:-1] if buffers else [b"\x00" * 8]
    elif how == 6:
        return [b"", _bomb(rng)]
    elif how == 7:  # a valid frame list with a random signature frame
        return [rng.randbytes(rng.choice([1, 32, 33])), _pack(header), *buffers]
    else:  # another kind's meta under this kind
        header["kind"] = rng.choice(list(kinds.SCHEMAS))
    return [b"", _pack(header), *buffers]


def decode_only(frames: int, seed: int = 0) -> dict[str, int]:
    """Run ``decode`` on hostile frames in-process; count outcomes. Anything that is not a
    WireError is a crash (the transport would still survive it, but decode must not)."""
    rng = random.Random(seed)
    base = valid_messages("tcp://127.0.0.1:1")
    out: dict[str, int] = {}
    for i in range(frames):
        try:
            decode(mutate(rng.choice(base), "tcp://127.0.0.1:1", i + 1, rng))
            name = "accepted"
        except WireError as exc:
            name = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - counting escapes is the point
            name = f"CRASH {type(exc).__name__}"
        out[name] = out.get(name, 0) + 1
    return out


def rss_mb() -> float:
    """Resident memory now (not the peak: frames in flight in ZeroMQ's queues come and go)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def flood(frames: int, seed: int = 0) -> dict[str, Any]:
    """Send hostile frames to a real Transport, then a real message; report what happened."""
    rng = random.Random(seed)
    log_sink = io.StringIO()
    handler = logging.StreamHandler(log_sink)
    logging.getLogger("loco").addHandler(handler)
    logging.getLogger("loco").setLevel(logging.INFO)
    target, peer = Transport("target"), Transport("peer")
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(target.endpoint)
    rss0 = rss_mb()
    try:
        base = valid_messages(peer.endpoint)
        for i in range(frames):
            raw.send_multipart(mutate(rng.choice(base), target.endpoint, i + 1, rng))
        # a valid message last on the same connection (ZeroMQ keeps its order): once it is
        # in, every hostile frame has been dealt with
        raw.send_multipart(encode(Message(kinds.DONE, sender="marker", session="end", seq=1, round=1, to=target.endpoint,
                                          meta={"ok": True, "missing": []})))
        if target.recv(kinds.DONE, 1, sender="marker", timeout_s=300) is None:
            raise SystemExit("the flood's last, valid message never arrived")
        # and a real peer's message, on its own connection
        peer.send(target.endpoint, Message(kinds.DONE, round=0, meta={"ok": True, "missing": []}))
        got = target.recv(kinds.DONE, 0, sender="peer", timeout_s=120)
        return {"frames": frames, "answered_after": got is not None, "io_thread_alive": target._thread.is_alive(),
                "dropped": dict(target.dropped), "held": target.mailbox.held(),
                "rss_growth_mb": rss_mb() - rss0, "log_bytes": len(log_sink.getvalue())}
    finally:
        raw.close()
        target.close()
        peer.close()
        logging.getLogger("loco").removeHandler(handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    outcomes = decode_only(args.frames, args.seed)
    crashes = sum(n for k, n in outcomes.items() if k.startswith("CRASH"))
    print(f"decode: {args.frames} frames in {time.perf_counter() - t0:.1f}s, {crashes} crashes")
    for name, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {n}")
    t0 = time.perf_counter()
    report = flood(args.frames, args.seed + 1)
    print(f"transport: {report['frames']} frames in {time.perf_counter() - t0:.1f}s; real peer answered after "
          f"the flood: {report['answered_after']}; I/O thread alive: {report['io_thread_alive']}")
    print(f"  RSS growth {report['rss_growth_mb']:.1f} MB, log {report['log_bytes']} bytes, "
          f"unread in mailbox {report['held']}")
    for name, n in sorted(report["dropped"].items(), key=lambda kv: -kv[1]):
        print(f"  dropped {name:<20} {n}")
    if crashes or not report["answered_after"] or not report["io_thread_alive"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
