"""Shared fixtures. Every child process a test starts is reaped, also when the test fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from loco.node.prefork import Forked, ForkServer

REPO = Path(__file__).resolve().parents[1]

# A small, fast configuration for real swarms on a busy 2-core machine. Deadlines are
# generous: these tests check behaviour, not speed.
FAST = [
    "model.n_layer=1", "model.n_embd=64", "model.n_head=4", "model.block_size=64",
    "data.batch_size=8", "data.max_bytes=1500000", "data.val_batches=2",
    "optim.inner_steps=8", "optim.warmup_steps=0", "optim.inner_lr=0.003",
    "train.log_every=4", "node.threads=1", "train.checkpoint_every=1",
    "swarm.announce_ttl_s=4", "swarm.join_timeout_s=120",
    "collective.matchmaking_timeout_s=25", "collective.join_timeout_s=60",
    "collective.allreduce_timeout_s=20", "collective.decision_timeout_s=20",
]


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``predicate`` (file contents, process state: things with no event to wait on)
    until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def run_each(fn: Callable[..., None], keys: list[tuple], timeout_s: float = 60) -> None:
    """``fn(*key)`` for every key, each on a thread of its own, all at once (the ranks or
    peers of a round in one process); fails if one is still running after ``timeout_s``."""
    threads = [threading.Thread(target=fn, args=key) for key in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    assert not any(t.is_alive() for t in threads), "a thread hung"


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def group_members(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


@dataclass
class Staged:
    """A process started ahead, waiting for its go file."""

    proc: subprocess.Popen | Forked
    go_file: Path

    def go(self) -> subprocess.Popen | Forked:
        self.go_file.touch()
        return self.proc


class Procs:
    """Starts `loco` CLI processes in their own sessions and kills their groups at the end.
    ``forks``: where they are forked from (their imports done once per test worker, as
    ``loco swarm`` does for its nodes); a process under a prefix starts afresh."""

    def __init__(self, tmp: Path, forks: ForkServer | None = None):
        self.tmp, self.forks = tmp, forks
        self.procs: list[subprocess.Popen | Forked] = []

    def loco(self, *args: str, log: str) -> subprocess.Popen | Forked:
        return self.python("-m", "loco.node.cli", *args, log=log)

    def python(self, *args: str, log: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen | Forked:
        """``python ARGS...`` (a script, or -m module) in a session of its own; ``prefix``:
        what runs it (``ip netns exec NS``)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.forks is not None and not prefix:
            p = self.forks.start(list(args), self.tmp / f"{log}.log", env, cwd=REPO)
        else:
            with (self.tmp / f"{log}.log").open("ab") as f:
                p = subprocess.Popen([*prefix, sys.executable, *args], stdout=f, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def staged(self, *args: str, log: str) -> Staged:
        """``python ARGS...`` started now, its imports done, but run only once ``go()`` is
        called (tests/loops/staged.py says why)."""
        go = self.tmp / f"{log}.{len(self.procs)}.go"
        return Staged(self.python("-m", "tests.loops.staged", str(go), *args, log=log), go)

    def staged_loco(self, *args: str, log: str) -> Staged:
        return self.staged("-m", "loco.node.cli", *args, log=log)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def reap(self) -> None:
        """Kill every process a test started and everything they started: a launcher's
        nodes run in sessions of their own, so killing the launcher's group is not enough."""
        from loco.node.reaper import descendants

        for p in self.procs:
            groups = {p.pid}
            for pid in descendants(p.pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    groups.add(os.getpgid(pid))
            for group in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=15)


@pytest.fixture(scope="session")
def forks():
    """One fork server per test worker (started with the first test that needs it)."""
    server = ForkServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def procs(tmp_path, request, forks):
    p = Procs(tmp_path, forks)
    request.node.loco_logs = tmp_path  # read by pytest_runtest_makereport if the test fails
    try:
        yield p
    finally:
        p.reap()


def _log_tails(root: Path, chars: int = 2000) -> str:
    """The end of every log under ``root`` (the processes' and a launcher's nodes')."""
    parts = []
    for path in sorted(root.rglob("*.log"))[:16]:
        text = path.read_text(errors="replace")
        parts.append(f"--- {path.relative_to(root)} (last {min(chars, len(text))} of {len(text)} chars)\n"
                     f"{text[-chars:]}")
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed swarm test reports what its processes logged: a timeout otherwise says only
    where the test was waiting, not why the swarm never got there."""
    outcome = yield
    report = outcome.get_result()
    root = getattr(item, "loco_logs", None)
    if report.when == "call" and report.failed and root is not None:
        report.sections.append(("loco process logs", _log_tails(root)))


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="node.device for every swarm test's nodes (e.g. cuda): runs the CPU suite's "
                          "swarms on a GPU machine")


def pytest_configure(config):
    device = config.getoption("--device")
    if device:
        FAST.append(f"node.device='{device}'")


def configured_device() -> str:
    """The node.device the swarm tests run with (pytest --device), 'cpu' by default."""
    for item in reversed(FAST):
        if item.startswith("node.device="):
            return item.split("=", 1)[1].strip("'\"")
    return "cpu"


def _swarms_first_on_every_worker(items: list, workers: int) -> list:
    """The real swarms (a minute each, seconds for the rest) spread over the chunks that
    ``--dist worksteal`` first hands the workers (contiguous: the first N // workers items to
    the first worker, and so on), each chunk starting with its swarms. Every worker then
    starts on long tests and ends on short ones, which an idle worker steals from the others'
    ends, instead of one worker running the last swarm alone."""
    swarms = [item for item in items if "swarm" in item.keywords]
    rest = [item for item in items if "swarm" not in item.keywords]
    sizes, left = [], len(items)
    for i in range(workers):  # what worksteal's first schedule sends each idle worker
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    ordered = []
    for i, size in enumerate(sizes):
        chunk = swarms[i::workers][:size]
        ordered += chunk + rest[:size - len(chunk)]
        rest = rest[size - len(chunk):]
    ordered += [item for item in swarms if item not in ordered] + rest  # (more swarms than a chunk holds)
    return ordered


def pytest_collection_modifyitems(config, items):
    import torch

    items[:] = _swarms_first_on_every_worker(items, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here); run on a GPU machine: pytest -m cuda")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
