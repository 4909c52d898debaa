"""A watchdog that kills a node's helper processes if the node dies without cleaning up.

hivemind's DHT runs in a forked process that starts p2pd; neither notices when the node
is SIGKILLed, so they would be orphaned. The node starts this small process first, with a
pipe on its stdin, and writes to it the "pid starttime" line of each DHT process as soon as
it is forked (before its bootstrap, which can take seconds). When the node is gone (it
closed the pipe, or this process was handed to another parent: a forked child of the node
may still hold the pipe open) the reaper kills every listed process that still has the
same start time (so a recycled pid is never hit), and their descendants (p2pd), then exits.

Run as: python -m loco.node.reaper  (the node does it; not meant for users)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
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
            [sys.executable, "-m", "loco.node.reaper"], stdin=subprocess.PIPE, text=True,
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
        """Normal shutdown: the helpers are already gone; the reaper exits on EOF."""
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


def _read_watched(watched: list[tuple[int, str]]) -> None:
    for line in sys.stdin:  # returns at EOF (the node closed the pipe) or at the node's END
        if line.strip() == END:
            return
        pid, st = line.split()
        watched.append((int(pid), st))


def main() -> None:
    # a terminal's Ctrl-C reaches the whole foreground group: outlive the node, don't die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the node shuts down, closes the pipe, we exit
    node = os.getppid()
    watched: list[tuple[int, str]] = []
    reader = threading.Thread(target=_read_watched, args=(watched,), daemon=True)
    reader.start()
    # EOF alone is not enough: the DHT process, forked after us, holds the pipe's write end
    while reader.is_alive() and os.getppid() == node:
        reader.join(POLL_S)
    # the helpers' descendants (p2pd) are listed before any is killed: killing a parent
    # first would hand its children to init, out of reach of ``descendants``
    doomed = [(pid, st) for pid, st in list(watched) if start_time(pid) == st]
    doomed += [(kid, st) for pid, _ in list(doomed) for kid in descendants(pid)
               if (st := start_time(kid)) is not None]
    for pid, st in doomed:
        if start_time(pid) == st:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
