"""Does loco's in-transport shaper give the same transfer times as the kernel's tc shaping?

Sends ``--megabytes`` over loco's transport in 4 MiB messages (what the collectives send),
the receiver acknowledging when it has everything, in two set-ups at the same bandwidth:

  (a) in-transport: both processes on 127.0.0.1, the sender's Shaper limits its uplink
  (b) kernel: sender and receiver in their own network namespaces joined by veth pairs
      shaped with tc tbf (scripts/netns.py); no in-transport shaping (root only)

    sudo python scripts/bench_shaper_vs_tc.py [--bandwidth 100mbit] [--megabytes 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PORT = 5591
CHUNK = 1 << 20  # floats: 4 MiB messages


def receiver(bind: str, count: int, repeats: int) -> None:
    from loco.protocols.transport import Transport
    from loco.protocols.wire import Message
    from scripts.bench_messages import BENCH_SCHEMAS

    t = Transport("recv", listen_host=bind, port=PORT, schemas=BENCH_SCHEMAS)
    for rep in range(repeats):
        sender = None
        for _ in range(count):
            got = t.mailbox.take("DATA", rep, 0, None, time.monotonic() + 600)
            sender = next(iter(got.values()))
        t.send(sender.meta["endpoint"], Message("ACK", round=rep))
    time.sleep(1.0)  # let the last ACK leave before the socket closes
    t.close()


def sender(bind: str, target: str, count: int, repeats: int, bandwidth: str | None) -> list[float]:
    import torch

    from loco.node.bandwidth import parse_bandwidth
    from loco.protocols.shaper import Shaper
    from loco.protocols.transport import Transport
    from loco.protocols.wire import Message
    from scripts.bench_messages import BENCH_SCHEMAS

    shaper = Shaper(uplink_bps=parse_bandwidth(bandwidth)) if bandwidth else None
    t = Transport("send", listen_host=bind, shaper=shaper, schemas=BENCH_SCHEMAS)
    data = torch.randn(CHUNK)
    times = []
    for rep in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            t.send(f"tcp://{target}:{PORT}", Message("DATA", round=rep, meta={"endpoint": t.endpoint}, tensors=[data]))
        if t.recv("ACK", rep, timeout_s=600) is None:
            raise RuntimeError("no acknowledgement")
        times.append(time.perf_counter() - start)
    t.close()
    return times


def _spawn(prefix: list[str], role: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, __file__, "--role", role, *args], cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bandwidth", default="100mbit")
    ap.add_argument("--megabytes", type=float, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--role", choices=["recv", "send"], help=argparse.SUPPRESS)
    ap.add_argument("--bind", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--target", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--shape", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    count = max(1, round(args.megabytes * 1e6 / (CHUNK * 4)))
    if args.role == "recv":
        receiver(args.bind, count, args.repeats)
        return
    if args.role == "send":
        times = sender(args.bind, args.target, count, args.repeats, args.bandwidth if args.shape else None)
        print(f"RESULT {statistics.median(times):.4f}", flush=True)
        return

    from loco.node.bandwidth import parse_bandwidth
    from scripts.netns import Namespaces, address

    nbytes = count * CHUNK * 4
    ideal = nbytes * 8 / parse_bandwidth(args.bandwidth)
    results = {}
    # (a) in-transport shaper on loopback
    recv = _spawn([], "recv", "--repeats", str(args.repeats), "--megabytes", str(args.megabytes))
    out = subprocess.run([sys.executable, __file__, "--role", "send", "--shape", "--bandwidth", args.bandwidth,
                          "--repeats", str(args.repeats), "--megabytes", str(args.megabytes)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    recv.wait(timeout=60)
    results["in-transport shaper"] = float(out.stdout.split("RESULT")[1])
    # (b) kernel tc shaping between two namespaces
    if os.geteuid() != 0:
        print("not root: skipping the kernel (tc) measurement", file=sys.stderr)
    else:
        with Namespaces(2, bandwidth=args.bandwidth) as ns:
            recv = _spawn(ns.command(1, []), "recv", "--bind", address(1), "--repeats", str(args.repeats),
                          "--megabytes", str(args.megabytes))
            try:
                out = subprocess.run(ns.command(0, [sys.executable, __file__, "--role", "send", "--bind", address(0),
                                                    "--target", address(1), "--repeats", str(args.repeats),
                                                    "--megabytes", str(args.megabytes)]),
                                     cwd=ROOT, capture_output=True, text=True, check=True)
                recv.wait(timeout=60)
            finally:
                if recv.poll() is None:
                    recv.kill()
                    recv.wait()
            results["kernel tc tbf"] = float(out.stdout.split("RESULT")[1])
    print(f"# {nbytes / 1e6:.1f} MB at {args.bandwidth} (ideal {ideal:.3f} s), median of {args.repeats}")
    print(f"{'shaping':<22} {'seconds':>8} {'Mbit/s':>8} {'vs ideal':>9}")
    for name, secs in results.items():
        print(f"{name:<22} {secs:>8.3f} {nbytes * 8 / secs / 1e6:>8.1f} {secs / ideal:>9.2f}")
    if len(results) == 2:
        a, b = results.values()
        print(f"in-transport / kernel time ratio: {a / b:.3f}")


if __name__ == "__main__":
    main()
