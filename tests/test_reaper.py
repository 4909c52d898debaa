"""The reaper ends a node's helper processes when the node dies without closing them."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import wait_until


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_process_leaves_no_helper_even_one_forked_after_its_reaper_and_its_children(procs, tmp_path):
    # the helper holds the reaper's pipe open (forked after it), so the reaper must notice
    # the death of its parent, not wait for the pipe's end; the grandchild was never listed
    pidfile = tmp_path / "pids"
    p = procs.python("-m", "tests.loops.reaped", str(pidfile), log="reaped")
    helper, grandchild = map(int, wait_until(lambda: pidfile.exists() and pidfile.read_text().split(), 120,
                                              "the helper and its child to start"))
    assert _alive(helper) and _alive(grandchild)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    wait_until(lambda: not _alive(helper) and not _alive(grandchild), 30, "the reaper to end the helpers")
