"""A watchdog that kills a node's helper processes if the node dies without cleaning up.

hivemind's DHT runs in a forked process that starts p2pd; neither notices when the node
is SIGKILLed, so they would be orphaned. The node starts this small process first, with a
pipe on its stdin, and writes to it the "pid starttime" line of each DHT process as soon as
it is forked (before its bootstrap, which can take seconds). When the node is gone (it
closed the pipe, or this process was handed to another parent: a forked child of the node
may still hold the pipe open) the reaper kills every listed process that still has the
same start time (so a recycled pid is never hit), and their descendants (p2pd), then exits.

Run as: python -m loco.node.reaper NODE_PID  (the node does it; not meant for users)
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

POLL_S = 0.25  # how often the reaper checks that the node is still its parent
END = "end"  # the node shuts down: a forked child holding the pipe open must not delay the reaper


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: starttime in clock ticks


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for k in map(int, kids):
                if k not in out:
                    out.append(k)
                    todo.append(k)
    return out


class Reaper:
    """The node's handle on its reaper process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "loco.node.reaper", str(os.getpid())], stdin=subprocess.PIPE, text=True,
            start_new_session=False,
        )

    def watch(self, pids: list[int]) -> None:
        for pid in pids:
            st = start_time(pid)
            if st is not None and self.proc.stdin:
                self.proc.stdin.write(f"{pid} {st}\n")
        if self.proc.stdin:
            self.proc.stdin.flush()

    def close(self) -> None:
        """Normal shutdown: the helpers are already gone; the reaper exits on the END line."""
        if self.proc.stdin:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(END + "\n")
                self.proc.stdin.flush()
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _read_lines(fd: int, buffer: bytearray, wait_s: float) -> tuple[list[str], bool]:
    """Complete lines readable from ``fd`` within ``wait_s``, and whether the pipe ended."""
    lines, ended = [], False
    while select.select([fd], [], [], wait_s)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            ended = True
            break
        buffer += chunk
        wait_s = 0.0  # what is already there, then back to the caller
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        lines.append(line.decode())
    return lines, ended


def main() -> None:
    # a terminal's Ctrl-C reaches the whole foreground group: outlive the node, don't die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the node shuts down, closes the pipe, we exit
    # the node's pid comes as an argument: under load the node can die before this process
    # has started, and os.getppid() would then already be the new parent's
    node = int(sys.argv[1])
    fd, buffer = sys.stdin.fileno(), bytearray()
    watched: list[tuple[int, str]] = []
    # EOF alone is not enough: the DHT process, forked after this one, holds the pipe open
    done = False
    while not done:
        alive = os.getppid() == node
        lines, ended = _read_lines(fd, buffer, POLL_S if alive else 0.0)  # (a dead node: what it wrote)
        for line in map(str.strip, lines):
            if line == END:
                done = True
            elif line:
                pid, st = line.split()
                watched.append((int(pid), st))
        done = done or ended or not alive
    # the helpers' descendants (p2pd) are listed before any is killed: killing a parent
    # first would hand its children to init, out of reach of ``descendants``
    doomed = [(pid, st) for pid, st in watched if start_time(pid) == st]
    doomed += [(kid, st) for pid, _ in list(doomed) for kid in descendants(pid)
               if (st := start_time(kid)) is not None]
    for pid, st in doomed:
        if start_time(pid) == st:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
