"""A watchdog that kills a node's helper processes if the node dies without cleaning up.

hivemind's DHT runs in a forked process that starts p2pd; neither notices when the node
is SIGKILLed, so they would be orphaned. The node starts this small process with a pipe
on its stdin and writes the helpers' "pid starttime" lines to it. When the pipe closes
(the node exited, however it died) the reaper kills every listed process that still has
the same start time (so a recycled pid is never hit), then exits.

Run as: python -m loco.node.reaper  (the node does it; not meant for users)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path


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
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    # a terminal's Ctrl-C reaches the whole foreground group: outlive the node, don't die first
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the node shuts down, closes the pipe, we exit
    watched: list[tuple[int, str]] = []
    for line in sys.stdin:  # returns at EOF, i.e. when the node is gone
        pid, st = line.split()
        watched.append((int(pid), st))
    for pid, st in watched:
        if start_time(pid) == st:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
