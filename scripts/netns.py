"""Kernel-level network emulation: one Linux network namespace per node, joined by veth
pairs to a bridge, each link shaped with tc (root only).

    sudo python scripts/netns.py up --nodes 4 --bandwidth 100mbit [--latency-ms 50]
    sudo python scripts/netns.py exec 2 -- python -m loco.node.cli node start ...
    sudo python scripts/netns.py down

Node i lives in namespace ``loco<i>`` with address 10.231.0.<i+1>/24 on its ``eth0``.
Bandwidth is shaped with ``tbf`` on both ends of every veth pair (the node's upload on its
side, its download on the bridge side). Delay and loss need ``netem``; where the kernel has
it (this tool checks), they are added under the tbf; where it does not (CONFIG_NET_SCH_NETEM
unset, as on the development machines), ask loco's in-transport shaper for latency and loss
instead. As a library, ``with Namespaces(...) as ns:`` removes everything on exit, also on
an exception or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

PREFIX = "loco"
BRIDGE = "locobr0"
SUBNET = "10.231.0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def has_netem() -> bool:
    """Try netem on a throwaway dummy device."""
    if sh("ip", "link", "add", "locoprobe0", "type", "dummy", check=False).returncode:
        return False
    try:
        return sh("tc", "qdisc", "add", "dev", "locoprobe0", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    finally:
        sh("ip", "link", "del", "locoprobe0", check=False)


def address(i: int, subnet: str = SUBNET) -> str:
    return f"{subnet}.{i + 1}"


def _shape(dev: str, bandwidth: str, latency_ms: float, loss: float, netem: bool, netns: str | None) -> None:
    pre = ["ip", "netns", "exec", netns] if netns else []
    # burst: at least one MTU-sized packet per timer tick at this rate; latency caps the queue
    tbf = ["tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", bandwidth,
           "burst", "256kb", "latency", "400ms"]
    sh(*pre, *tbf)
    if netem and (latency_ms or loss):
        extra = ["delay", f"{latency_ms}ms"] + (["loss", f"{loss * 100}%"] if loss else [])
        sh(*pre, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", *extra)


class Namespaces:
    """Creates the namespaces and links on enter; removes them on exit, whatever happened."""

    def __init__(self, nodes: int, bandwidth: str | None = None, latency_ms: float = 0.0, loss: float = 0.0,
                 prefix: str = PREFIX, subnet: str = SUBNET, hosts: bool = False, handle_sigterm: bool = True):
        """``prefix``, ``subnet``: names (namespaces ``<prefix><i>``, bridge ``<prefix>br0``)
        and the /24 of this set, so that several sets can exist at once. ``hosts``: each
        namespace resolves the names ``node<i>`` to their addresses (an /etc/netns hosts
        file, as a container network's DNS resolves service names). ``handle_sigterm``:
        turn SIGTERM into an exception so that the namespaces are removed (off inside a
        program that handles its own signals)."""
        self.nodes = nodes
        self.bandwidth = bandwidth
        self.latency_ms = latency_ms
        self.loss = loss
        self.netem = False
        self.prefix = prefix
        self.subnet = subnet
        self.hosts = hosts
        self.bridge = f"{prefix}br0"
        self.handle_sigterm = handle_sigterm

    def address(self, i: int) -> str:
        return address(i, self.subnet)

    def __enter__(self) -> Namespaces:
        # SIGTERM would end the interpreter without running __exit__: make it an exception
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        self.netem = has_netem()
        if (self.latency_ms or self.loss) and not self.netem:
            print("netns: this kernel has no netem; latency/loss must come from loco's shaper", file=sys.stderr)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.nodes):
            ns, host_dev = f"{self.prefix}{i}", f"{self.prefix}v{i}"
            sh("ip", "netns", "add", ns)
            if self.hosts:  # `ip netns exec` shows this file as the namespace's /etc/hosts
                names = "".join(f"{self.address(j)} node{j}\n" for j in range(self.nodes))
                folder = Path("/etc/netns") / ns
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "hosts").write_text(f"127.0.0.1 localhost\n{names}")
            sh("ip", "link", "add", host_dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", host_dev, "master", self.bridge)
            sh("ip", "link", "set", host_dev, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            if self.bandwidth:
                _shape("eth0", self.bandwidth, self.latency_ms, self.loss, self.netem, ns)  # upload
                _shape(host_dev, self.bandwidth, 0.0, 0.0, self.netem, None)  # download

    def down(self) -> None:
        for i in range(self.nodes):
            sh("ip", "netns", "del", f"{self.prefix}{i}", check=False)  # also removes its veth pair
            sh("ip", "link", "del", f"{self.prefix}v{i}", check=False)
            shutil.rmtree(Path("/etc/netns") / f"{self.prefix}{i}", ignore_errors=True)
        sh("ip", "link", "del", self.bridge, check=False)

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", f"{self.prefix}{i}", *argv]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--nodes", type=int, required=True)
    up.add_argument("--bandwidth", default=None, help="tc rate, e.g. 100mbit")
    up.add_argument("--latency-ms", type=float, default=0.0)
    up.add_argument("--loss", type=float, default=0.0)
    down = sub.add_parser("down")
    down.add_argument("--nodes", type=int, default=64)
    ex = sub.add_parser("exec")
    ex.add_argument("index", type=int)
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.cmd == "up":
        Namespaces(args.nodes, args.bandwidth, args.latency_ms, args.loss).__enter__()
        print(f"{args.nodes} namespaces up: {', '.join(address(i) for i in range(args.nodes))}")
    elif args.cmd == "down":
        Namespaces(args.nodes).down()
    else:
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        sys.exit(subprocess.call(Namespaces(0).command(args.index, argv)))


if __name__ == "__main__":
    main()
