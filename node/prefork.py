"""Node processes forked from an interpreter that has already imported what a node needs.

Before a node process does anything it spends seconds of CPU importing torch (with
torch._dynamo, which the first torch.optim optimizer imports: about half of it), hivemind
and loco. A launcher that starts N nodes on one machine pays that N times, at once, on the
cores the nodes then train on (4.5 s of CPU per node on a quiet 2-core machine, three times
that on a busy one; scripts/bench_node_start.py). A launcher can
instead start one ``ForkServer``: a process that imports them once and forks every node
from itself. Each node is a real process of its own, in a session of its own (its group
can be killed whole), with its own log, environment, working directory and arguments,
running ``python -m MODULE ARGS`` (or ``python SCRIPT ARGS``) as a fresh interpreter
would: the same ``sys.argv`` and ``sys.path[0]``, its exit code, its atexit handlers, a
traceback and exit code 1 for an exception it does not catch.

The server has imported torch but run nothing on it (no thread pools, no CUDA), and has no
thread of its own, so a fork is as safe as a fresh start. Processes that need a fresh
interpreter (``ip netns exec`` prefixes, interpreter options) are started as before.

Run as: python -m loco.node.prefork FD  (a ForkServer does it; not meant for users)
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import setproctitle

# what a node process imports before it trains (loco's own modules bring the rest)
PRELOAD = ("torch", "torch._dynamo", "hivemind", "loco.node.cli", "loco.node.daemon",
           "loco.node.pipeline.node", "loco.node.rank_launch")
IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # by the server, not by its forks
LOST = 255  # the exit code of a fork that ended after its server: the real one is lost
START_TIMEOUT_S = 300.0  # a fork starts in milliseconds; the first waits for the server's imports


def forkable(args: Sequence[str]) -> bool:
    """Whether ``python ARGS`` can run as a fork: ``-m MODULE ...`` or ``SCRIPT ...``
    (no interpreter options)."""
    return bool(args) and (args[0] == "-m" and len(args) >= 2 or not args[0].startswith("-"))


class ForkServer:
    """The launcher's end: starts the server process at once (its imports overlap what the
    launcher does next) and forks processes from it. Thread-safe. ``close()`` ends the
    server, not the processes it forked."""

    def __init__(self, preload: Sequence[str] = PRELOAD):
        ours, theirs = socket.socketpair()
        self._sock, self._buf = ours, bytearray()
        self._lock = threading.Lock()
        self._codes: dict[int, int] = {}  # pid -> exit code (negative: the signal), as the server reaped it
        self._replies: list[dict] = []
        self._gone = False
        self._proc = subprocess.Popen([sys.executable, "-m", "loco.node.prefork", str(theirs.fileno()), *preload],
                                      pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()

    @property
    def pid(self) -> int:
        """The server process's pid."""
        return self._proc.pid

    def start(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: Path | str | None = None) -> Forked:
        """``python ARGS`` (see ``forkable``) as a fork, in a session of its own, stdout and
        stderr appended to ``log_path``, stdin from /dev/null, with ``env`` (default: this
        process's) and ``cwd``. Returns once it is in its session with its log open."""
        if not forkable(args):
            raise ValueError(f"cannot fork python {' '.join(args)}: only -m MODULE or SCRIPT")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        request = {"args": list(args), "log": str(log_path), "env": dict(os.environ if env is None else env),
                   "cwd": os.path.abspath(cwd or os.getcwd())}
        with self._lock:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self._replies:
                if self._gone or not self._pump(deadline - time.monotonic()):
                    raise RuntimeError(f"the fork server did not start python {' '.join(args)}")
            reply = self._replies.pop(0)
        if "error" in reply:
            raise RuntimeError(f"the fork server could not start python {' '.join(args)}: {reply['error']}")
        return Forked(self, int(reply["pid"]), ["python", *args])

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s exit code once the server reaped it, waiting up to ``timeout`` (None:
        for ever); None if it still runs. A fork that ended after the server (killed with
        SIGKILL) has no code to report: ``LOST``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                while not self._gone and pid not in self._codes and self._pump(0.0):
                    pass  # (what came already)
                if pid in self._codes:
                    return self._codes[pid]
                gone = self._gone
            if gone and not _alive(pid):
                return LOST
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            wait = 1.0 if left is None else min(left, 1.0)
            if gone:  # (nothing to read: look again soon)
                time.sleep(min(wait, 0.1))
                continue
            with self._lock:
                if not self._gone:
                    self._pump(wait)

    def _pump(self, timeout: float) -> bool:
        """Read what the server sent within ``timeout``; False if nothing came."""
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        data = self._sock.recv(65536)
        if not data:
            self._gone = True
            return False
        self._buf += data
        while b"\n" in self._buf:
            line, _, rest = self._buf.partition(b"\n")
            self._buf = bytearray(rest)
            msg = json.loads(line)
            if "exit" in msg:
                self._codes[int(msg["exit"])] = int(msg["code"])
            else:
                self._replies.append(msg)
        return True

    def close(self) -> None:
        with self._lock:
            while not self._gone and self._pump(0.0):
                pass  # (the exit codes sent already)
            self._gone = True
            self._sock.close()  # (the server exits when its end reads EOF)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (not a zombie): for forks whose server is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Forked:
    """A forked process's handle, with the parts of ``subprocess.Popen`` a launcher uses:
    ``pid``, ``args``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate``,
    ``kill``. Its return code is negative for a signal, as Popen's."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]):
        self._server, self.pid, self.args = server, pid, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------- the server process
def _serve(sock: socket.socket) -> None:
    """Fork a process per request; report each one's pid once it started, and its exit code
    once it ended. Ends when the launcher closes its end."""
    # signals to the launcher's process group (Ctrl-C, a service manager's SIGTERM, a closed
    # terminal) are the launcher's: it stops its nodes, and needs the server for their exit
    # codes meanwhile; the server ends when the launcher does (its end of the socket closes)
    for sig in IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # (the wakeup fd is what wakes the loop)
    buf = bytearray()
    while True:
        ready, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _report_exits(sock)
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, _, rest = buf.partition(b"\n")
                buf = bytearray(rest)
                _fork_one(sock, json.loads(line), (wake_r, wake_w))


def _report_exits(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.sendall(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def _fork_one(sock: socket.socket, request: dict, server_fds: tuple[int, int]) -> None:
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(started_r)
        signal.set_wakeup_fd(-1)
        for sig in (*IGNORED, signal.SIGCHLD):  # (as a fresh python has them)
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        sock.close()
        for fd in server_fds:
            os.close(fd)
        _run(request["args"], request["log"], request["env"], request["cwd"], started_w)
    os.close(started_w)
    ok = os.read(started_r, 1)  # (the child closes it once in its session with its log open, or dies)
    os.close(started_r)
    reply = {"pid": pid} if ok else {"error": "it ended before it started (see its log)"}
    sock.sendall(json.dumps(reply).encode() + b"\n")


def _run(args: list[str], log_path: str, env: dict[str, str], cwd: str, started_w: int) -> None:
    """In the fork: become the process ``python ARGS`` would be, run it, exit as it would."""
    code = 1
    try:
        os.setsid()
        # ps shows what it runs (before the environment changes: setproctitle finds the
        # command line's memory through it)
        setproctitle.setproctitle(" ".join([sys.executable, *args]))
        log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (log, 1), (log, 2)):
            os.dup2(fd, target)
        os.close(log)
        os.close(null)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        _std_streams(bool(env.get("PYTHONUNBUFFERED")))
        os.write(started_w, b"1")
        os.close(started_w)
        code = _run_main(args, cwd)
    finally:
        os._exit(code)  # (the server's own code after the fork must never run here)


def _run_main(args: list[str], cwd: str) -> int:
    try:
        if args[0] == "-m":
            module = args[1]
            sys.argv = [module, *args[2:]]  # (runpy puts the module's file in argv[0])
            sys.path[0] = cwd  # python -m: the working directory first
            sys.modules.pop(module, None)  # (imported by the server: run it afresh as __main__)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script = os.path.abspath(args[0])
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(script)  # python SCRIPT: the script's directory first
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        _at_exit()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # (as python does: die of the SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException as exc:  # noqa: BLE001 (what python prints for an exception nothing caught)
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            tb = tb.tb_next  # (from the program's own frames, as python shows it)
        traceback.print_exception(type(exc), exc, tb)
        code = 1
    _at_exit()
    return code


def _std_streams(unbuffered: bool) -> None:
    """sys.stdin/stdout/stderr on the new descriptors, buffered as python buffers them with
    this environment (the server's were made for its own)."""
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),  # noqa: SIM115
                                  encoding="utf-8", write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), encoding="utf-8",  # noqa: SIM115
                                  errors="backslashreplace", line_buffering=True, write_through=True)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _at_exit() -> None:
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def main() -> None:
    fd, preload = int(sys.argv[1]), sys.argv[2:]
    sock = socket.socket(fileno=fd)
    for module in preload:
        with contextlib.suppress(ImportError):  # (an extra not installed: its forks import what they need)
            __import__(module)
    _serve(sock)


if __name__ == "__main__":
    main()
