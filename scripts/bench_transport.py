"""Point-to-point tensor throughput: loco's transport vs raw pyzmq sends of the same bytes.

Two processes on 127.0.0.1. The sender pushes ``count`` messages of ``size`` float32
elements; the receiver answers once it has all of them; the time is from the first send
to that answer. Both sides use copy=False. Prints a table with the ratio loco / raw, for
loco without a key and with one (every message signed and verified: the cost of
authentication).

    python scripts/bench_transport.py [--sizes 262144,4194304,26214400] [--megabytes 800] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _transport(name: str, key: bytes | None):
    """A loco transport that also accepts this benchmark's two message kinds."""
    from loco.protocols.transport import Transport
    from scripts.bench_messages import BENCH_SCHEMAS

    return Transport(name, key=key, schemas=BENCH_SCHEMAS)


def _loco_receiver(conn, count: int, repeats: int, key: bytes | None) -> None:
    from loco.protocols.wire import Message

    t = _transport("recv", key)
    conn.send(t.endpoint)
    for rep in range(repeats):
        got = t.mailbox.take("DATA", rep, 0, None, time.monotonic() + 600, want=1)
        sender = next(iter(got.values()))
        for _ in range(count - 1):
            t.mailbox.take("DATA", rep, 0, None, time.monotonic() + 600, want=1)
        t.send(sender.meta["endpoint"], Message("ACK", round=rep))
    conn.recv()
    t.close()


def _loco_sender(endpoint: str, size: int, count: int, repeats: int, key: bytes | None) -> list[float]:
    import torch

    from loco.protocols.wire import Message

    t = _transport("send", key)
    data = torch.randn(size)
    times = []
    for rep in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            t.send(endpoint, Message("DATA", round=rep, meta={"endpoint": t.endpoint}, tensors=[data]))
        if t.recv("ACK", rep, timeout_s=600) is None:
            raise RuntimeError("receiver did not acknowledge")
        times.append(time.perf_counter() - start)
    t.close()
    return times


def _raw_receiver(conn, count: int, repeats: int) -> None:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.ROUTER)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    for _ in range(repeats):
        for _ in range(count):
            frames = pull.recv_multipart(copy=False)
        pull.send_multipart([frames[0].bytes, b"ack"])
    conn.recv()
    pull.close(linger=0)
    ctx.term()


def _raw_sender(endpoint: str, size: int, count: int, repeats: int) -> list[float]:
    import numpy as np
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.DEALER)
    push.connect(endpoint)
    data = np.random.randn(size).astype(np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            push.send_multipart([b"header", memoryview(data)], copy=False)
        push.recv()
        times.append(time.perf_counter() - start)
    push.close(linger=0)
    ctx.term()
    return times


def run_pair(kind: str, size: int, count: int, repeats: int) -> float:
    """``kind``: raw, loco (insecure: no key), or loco+key (every message signed and checked)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    key = b"bench-key" if kind == "loco+key" else None
    loco = kind.startswith("loco")
    proc = ctx.Process(target=_loco_receiver if loco else _raw_receiver,
                       args=(child, count, repeats, key) if loco else (child, count, repeats))
    proc.start()
    try:
        endpoint = parent.recv()
        times = (_loco_sender(endpoint, size, count, repeats, key) if loco
                 else _raw_sender(endpoint, size, count, repeats))
        parent.send("done")
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="262144,4194304,26214400", help="float32 elements per message")
    ap.add_argument("--megabytes", type=float, default=800, help="bytes sent per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"{'message':>10} {'count':>6} {'raw s':>8} {'raw GB/s':>9} {'loco s':>8} {'loco GB/s':>10} "
          f"{'loco/raw':>9} {'keyed s':>8} {'keyed/raw':>10}")
    for size in (int(s) for s in args.sizes.split(",")):
        nbytes = size * 4
        count = max(1, int(args.megabytes * 1e6 / nbytes))
        raw = run_pair("raw", size, count, args.repeats)
        loco = run_pair("loco", size, count, args.repeats)
        keyed = run_pair("loco+key", size, count, args.repeats)
        total = nbytes * count / 1e9
        print(f"{nbytes / 1e6:>8.1f}MB {count:>6} {raw:>8.3f} {total / raw:>9.2f} {loco:>8.3f} "
              f"{total / loco:>10.2f} {raw / loco:>9.2f} {keyed:>8.3f} {raw / keyed:>10.2f}")


if __name__ == "__main__":
    main()
