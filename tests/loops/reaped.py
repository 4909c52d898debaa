"""A process that dies the way a node killed during its DHT's bootstrap does:
``python -m tests.loops.reaped PIDFILE``.

It starts its reaper first, then forks a helper (as hivemind forks the DHT process: the
helper inherits the pipe to the reaper) that starts a grandchild of its own (as the DHT
process starts p2pd), tells the reaper of the helper only, writes "helper grandchild" to
PIDFILE and waits to be killed. The test SIGKILLs it and expects both gone."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

from loco.node.reaper import Reaper


def helper(started) -> None:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    started.put(grandchild.pid)
    time.sleep(600)


if __name__ == "__main__":
    pidfile = Path(sys.argv[1])
    reaper = Reaper()
    ctx = multiprocessing.get_context("fork")
    started = ctx.Queue()
    proc = ctx.Process(target=helper, args=(started,))
    proc.start()
    reaper.watch([proc.pid])  # the grandchild is not listed: the reaper finds it at reap time
    grandchild = started.get(timeout=60)
    pidfile.write_text(f"{proc.pid} {grandchild}")
    time.sleep(600)
