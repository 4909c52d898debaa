"""Forged and replayed messages and DHT records, by kind and outcome, against a keyed swarm.

    python scripts/bench_forgery.py

Real ZeroMQ transports and real hivemind DHT nodes on 127.0.0.1, in one process. A member
``a`` and a target ``b`` share a swarm key; an insider holds the key too, with a node key of
its own; an outsider has no key or another one. For every message kind loco sends (the meta
each sender writes, from scripts/fuzz.py), the attacks are:

- spoofed sender: the insider signs a message claiming to come from ``a`` (whom ``b`` knows);
- unsigned / another key: an outsider's message;
- captured at ``a``, replayed to ``b`` (wrong destination);
- captured at ``b``, replayed to ``b`` (replay);
- captured at ``b``, replayed after ``b`` restarted on the same port (a new process).

Then, DHT records: a record under a live member's id written by an insider (its own node
key), one written by a key holder without a node signature, and one by a process without
the swarm key. Prints one row per attack: how many were sent, how many were delivered
(must be 0) and the reasons they were dropped.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz import valid_messages  # noqa: E402  (a script beside this one)

from loco.protocols.identity import NodeKey  # noqa: E402
from loco.protocols.membership import Membership, PeerInfo  # noqa: E402
from loco.protocols.messages import SCHEMAS  # noqa: E402
from loco.protocols.transport import Transport  # noqa: E402
from loco.protocols.wire import Message, encode  # noqa: E402

KEY = b"bench-forgery"


def _raw(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _settle(t: Transport, sent: int, before: int) -> None:
    """Wait until ``t`` has dropped or filed all ``sent`` messages (or nothing moves for 2 s)."""
    deadline = time.monotonic() + 30
    last, still = -1, 0.0
    while time.monotonic() < deadline and still < 2.0:
        now = sum(t.dropped.values()) - before + t.mailbox.held()[0]
        if now >= sent:
            return
        still = still + 0.2 if now == last else 0.0
        last = now
        time.sleep(0.2)


def _delivered(t: Transport, kinds: list[str]) -> int:
    got = 0
    for kind in kinds:
        for rnd in (-1, 0, 3, 2, 1):
            for attempt in (0, 7):
                while t.recv(kind, rnd, attempt, timeout_s=0) is not None:
                    got += 1
    return got


def _copy(msg: Message, **change) -> Message:
    fields = dict(kind=msg.kind, round=msg.round, attempt=msg.attempt, meta=dict(msg.meta), tensors=msg.tensors)
    return Message(**{**fields, **change})


def messages() -> list[tuple[str, int, int, Counter]]:
    a, b = Transport("a", key=KEY), Transport("b", key=KEY)
    insider = NodeKey.generate()
    rows = []
    try:
        # b binds "a" to a's key, as it does on the first message of a real member
        a.send(b.endpoint, Message("JOIN", round=99, meta={"state_hash": "", "weight": 1.0, "endpoint": a.endpoint}))
        while b.recv("JOIN", 99, timeout_s=10) is None:
            pass
        base = valid_messages(b.endpoint)
        kinds = sorted({m.kind for m in base})
        assert set(kinds) <= set(SCHEMAS), "fuzz.valid_messages names a kind loco does not send"
        seq = iter(range(1, 10**9))

        def attack(name: str, frames_list: list[list], target: Transport) -> None:
            before = Counter(target.dropped)
            sock = _raw(target.endpoint)
            for frames in frames_list:
                sock.send_multipart(frames)
            _settle(target, len(frames_list), sum(before.values()))
            sock.close()
            delivered = _delivered(target, kinds)
            reasons = Counter(target.dropped) - before
            rows.append((name, len(frames_list), delivered, reasons))

        now = time.time
        spoofed = [encode(_copy(m, sender="a", session="forged", seq=next(seq), time=now(), to=b.endpoint), KEY,
                          insider) for m in base]
        attack("spoofed sender (insider signs as a live member)", spoofed, b)
        outsiders = [encode(_copy(m, sender="x", session="x", seq=next(seq), time=now(), to=b.endpoint), key, NodeKey.generate())
                     for m in base for key in (None, b"another-key")]
        attack("outsider: unsigned or another swarm key", outsiders, b)
        to_a = [encode(_copy(m, sender="a", session=a.session, seq=next(seq), time=now(), to=a.endpoint), KEY,
                       a.node_key) for m in base]
        attack("captured on its way to a, replayed to b", to_a, b)
        # captured on its way to b: delivered once (first row), then replayed
        to_b = [encode(_copy(m, sender="a", session=a.session, seq=next(seq), time=now(), to=b.endpoint), KEY,
                       a.node_key) for m in base]
        attack("genuine messages of a (reference: these are delivered)", to_b, b)
        attack("captured on its way to b, replayed to b", to_b, b)
        port = int(b.endpoint.rsplit(":", 1)[1])
        b.close()
        time.sleep(2.5)  # > the 2 s of clock skew allowed: the capture predates the new process
        b = Transport("b", port=port, key=KEY)
        attack("captured on its way to b, replayed after b restarted", to_b, b)
    finally:
        a.close()
        b.close()
    return rows


def records() -> list[tuple[str, int, int, Counter]]:
    a = Membership("forgery", "a", key=KEY, ttl_s=30)
    made = [a]
    rows = []
    try:
        member = Membership("forgery", "m", initial_peers=a.maddrs, key=KEY, ttl_s=30)
        made.append(member)
        member.announce(PeerInfo("m", "tcp://127.0.0.1:2", round=5))
        deadline = time.monotonic() + 60
        while [p.id for p in a.peers()] != ["m"] and time.monotonic() < deadline:
            time.sleep(0.2)
        insider = Membership("forgery", "m", initial_peers=a.maddrs, key=KEY, ttl_s=30)  # m's id, its own key
        keyless = Membership("forgery", "z", initial_peers=a.maddrs, key=None, ttl_s=30)
        made += [insider, keyless]
        attempts = 5
        for name, write in [
            ("record under a live member's id, by an insider", lambda i: insider.announce(
                PeerInfo("m", f"tcp://evil:{i}", round=10**6))),
            ("record without a node signature, by a key holder", lambda i: insider.dht.store(
                "forgery.peers", {"endpoint": f"tcp://evil:{i}", "round": 10**6}, insider._get_time() + 30,
                subkey=f"u{i}")),
            ("record by a process without the swarm key", lambda i: keyless.announce(
                PeerInfo("z", f"tcp://evil:{i}", round=10**6))),
        ]:
            before = Counter(a.ignored.counts)
            believed = 0
            for i in range(attempts):
                write(i)
                time.sleep(0.5)
                believed += sum("evil" in p.endpoint or p.round >= 10**6 for p in a.peers())
            reasons = Counter(a.ignored.counts) - before
            if not reasons:
                reasons = Counter({"never stored (the DHT refuses records without the swarm key)": attempts})
            rows.append((name, attempts, believed, reasons))
        member.announce(PeerInfo("m", "tcp://127.0.0.1:2", round=6))
        time.sleep(1)
        ok = [p.id for p in a.peers()] == ["m"]
        rows.append(("the member's own record afterwards", 1, int(ok), Counter()))
    finally:
        for m in reversed(made):
            m.shutdown()
    return rows


def main() -> int:
    rows = messages() + records()
    print("| attack | sent | delivered / believed | dropped, by reason |")
    print("|---|---|---|---|")
    for name, sent, delivered, reasons in rows:
        why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "—"
        print(f"| {name} | {sent} | {delivered} | {why} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
