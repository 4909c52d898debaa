"""Processes forked from the fork server (``loco swarm``'s nodes, the test harness's
processes) behave as ``python ARGS`` started afresh would: arguments, sys.path, working
directory, environment, session, output, exit codes, atexit handlers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loco.node.prefork import LOST, ForkServer, forkable
from loco.node.swarm import spawn

PROGRAM = """
import atexit, json, os, sys, warnings
atexit.register(lambda: print("atexit ran", flush=True))
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "env": os.environ.get("PROBE"),
                  "own_session": os.getsid(0) == os.getpid(), "name": __name__, "stdin": sys.stdin.read()}),
      flush=True)
what = sys.argv[1]
if what == "exit":
    sys.exit(int(sys.argv[2]))
if what == "message":
    sys.exit("a message")
if what == "raise":
    raise ValueError("raised by the program")
if what == "wait":
    import time
    time.sleep(600)
"""


@pytest.fixture
def program(tmp_path):
    path = tmp_path / "program.py"
    path.write_text(PROGRAM)
    return path


def _first(log) -> dict:
    return json.loads(log.read_text().splitlines()[0])


def test_a_forked_script_sees_what_a_fresh_python_would(forks, program, tmp_path):
    log = tmp_path / "out.log"
    p = forks.start([str(program), "ok", "x"], log, env={"PROBE": "here", "PYTHONUNBUFFERED": "1"}, cwd=tmp_path.parent)
    assert p.wait(60) == 0 and p.returncode == 0 and p.poll() == 0
    seen = _first(log)
    assert seen == {"argv": [str(program), "ok", "x"], "path0": str(tmp_path), "cwd": str(tmp_path.parent),
                    "env": "here", "own_session": True, "name": "__main__", "stdin": ""}
    assert log.read_text().splitlines()[-1] == "atexit ran"
    q = forks.start([str(program), "wait"], tmp_path / "b.log", cwd=tmp_path)
    try:  # ps shows what it runs, not the fork server's command line
        shown = Path(f"/proc/{q.pid}/cmdline").read_text().replace("\0", " ").strip()
        assert shown == f"{sys.executable} {program} wait", shown
    finally:
        q.kill()
    # what a fresh interpreter prints for the same program
    fresh = subprocess.run([sys.executable, str(program), "ok", "x"], capture_output=True, text=True,
                           env={**os.environ, "PROBE": "here"}, cwd=tmp_path.parent, stdin=subprocess.DEVNULL)
    assert {**json.loads(fresh.stdout.splitlines()[0]), "own_session": True} == seen


@pytest.mark.parametrize(("args", "code", "tail"), [
    (["exit", "3"], 3, "atexit ran"),
    (["message"], 1, "atexit ran"),
    (["raise"], 1, "ValueError: raised by the program"),
])
def test_exit_codes_and_uncaught_exceptions_as_python_reports_them(forks, program, tmp_path, args, code, tail):
    log = tmp_path / "out.log"
    p = forks.start([str(program), *args], log, cwd=tmp_path)
    assert p.wait(60) == code
    text = log.read_text()
    assert tail in text
    if args == ["message"]:
        assert "a message" in text
    if args == ["raise"]:  # the traceback starts at the program, not at the fork server
        assert "prefork" not in text and 'program.py", line' in text


def test_a_signal_ends_it_with_a_negative_code_and_its_group_can_be_killed(forks, program, tmp_path):
    p = forks.start([str(program), "wait"], tmp_path / "a.log", cwd=tmp_path)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(0.2)
    assert p.poll() is None
    p.terminate()
    assert p.wait(60) == -signal.SIGTERM
    q = forks.start([str(program), "wait"], tmp_path / "b.log", cwd=tmp_path)
    os.killpg(q.pid, signal.SIGKILL)  # (in a session of its own from the start: its group is its pid)
    assert q.wait(60) == -signal.SIGKILL
    q.kill()  # (ended already: nothing to signal)


def test_a_module_runs_as_main(forks, tmp_path):
    log = tmp_path / "cli.log"
    p = forks.start(["-m", "loco.node.cli", "--help"], log, cwd=tmp_path)
    assert p.wait(60) == 0
    text = log.read_text()
    assert "Usage:" in text and "Warning" not in text  # (the server imported the module: run afresh)


def test_only_plain_module_or_script_invocations_are_forked(forks, tmp_path):
    assert forkable(["-m", "loco.node.cli"]) and forkable(["x.py", "-v"])
    assert not forkable([]) and not forkable(["-m"]) and not forkable(["-X", "importtime", "x.py"])
    with pytest.raises(ValueError, match="only -m MODULE or SCRIPT"):
        forks.start(["-c", "print(1)"], tmp_path / "c.log")
    # spawn starts what it cannot fork afresh
    p = spawn([sys.executable, "-c", "print('fresh')"], tmp_path / "c.log", forks=forks)
    assert isinstance(p, subprocess.Popen) and p.wait(60) == 0
    assert (tmp_path / "c.log").read_text().strip() == "fresh"


def test_the_server_outlives_signals_to_the_launchers_group_and_a_fork_outlives_the_server(program, tmp_path):
    """A launcher's group gets SIGTERM (a service manager, ``timeout``) or SIGHUP: the
    launcher stops its nodes and needs the server for their exit codes meanwhile. A server
    killed anyway leaves its forks running; one that ends then has no code to report."""
    server = ForkServer(preload=())  # (nothing to import: a plain script)
    try:
        first = server.start([str(program), "exit", "4"], tmp_path / "a.log", cwd=tmp_path)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(server.pid, sig)
        assert first.wait(60) == 4
        late = server.start([str(program), "wait"], tmp_path / "b.log", cwd=tmp_path)
        os.kill(server.pid, signal.SIGKILL)
        with pytest.raises(subprocess.TimeoutExpired):
            late.wait(0.5)  # still running, its server gone
        late.kill()
        assert late.wait(60) == LOST
    finally:
        server.close()
