"""Local swarm launcher: N node daemons as separate OS processes on this machine.

Each node runs in its own session (process group), so its helpers (hivemind's DHT process,
p2pd, the reaper) can be killed as a group: the launcher never leaves an orphan, whether
the nodes finish, fail, or the user presses Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loco.token import new_key

from .config import Config, SwarmConfig
from .metrics import MetricsFollower
from .prefork import Forked, ForkServer, forkable

# logs and CI are not terminals: keep lines and the summary table unwrapped there
console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)


@dataclass
class LocalNode:
    id: str
    proc: subprocess.Popen | Forked
    log_path: Path
    metrics_path: Path | None = None
    start: dict | None = None  # its first start record
    last: dict | None = None  # its latest round record
    outcomes: Counter = field(default_factory=Counter)  # rounds by status
    _follower: MetricsFollower | None = field(default=None, repr=False)

    def follow(self) -> list[dict]:
        """The records the node wrote since the last call (read incrementally), keeping
        what the summary needs."""
        if self.metrics_path is None:
            return []
        if self._follower is None:
            self._follower = MetricsFollower(self.metrics_path)
        new = self._follower.new_records()
        for r in new:
            if r.get("event") == "start" and self.start is None:
                self.start = r
            elif r.get("event") == "outer":
                self.last = r
                self.outcomes[r.get("status")] += 1
        return new


def node_command(node_id: str, out: Path, config: str | None, overrides: list[str],
                 initial_peer: str | None, join_file: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "loco.node.cli", "node", "start", "--out", str(out), "--node-id", node_id]
    if config:
        cmd += ["--config", config]
    for item in overrides:
        cmd += ["--set", item]
    if initial_peer:
        cmd += ["--initial-peer", initial_peer]
    if join_file is not None:
        cmd += ["--join-file", str(join_file)]
    return cmd


def launch_env(swarm: SwarmConfig) -> dict[str, str]:
    """The environment of the nodes a launcher starts: one fresh swarm key for them all
    (in the environment, not on their command lines), unless the configuration has a key
    or asks for an insecure swarm."""
    env = dict(os.environ)
    if not swarm.key and not swarm.insecure:
        env["LOCO_SWARM_KEY"] = new_key()
    return env


def spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
          forks: ForkServer | None = None) -> subprocess.Popen | Forked:
    """``cmd`` in a session of its own, its output appended to ``log_path``: forked from
    ``forks`` if it runs this interpreter on a module or script (its imports are done
    there), else started afresh."""
    if forks is not None and cmd[0] == sys.executable and forkable(cmd[1:]):
        return forks.start(cmd[1:], log_path, env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def wait_for_file(path: Path, proc: subprocess.Popen | Forked, timeout_s: float) -> dict:
    """The node writes this file once its DHT and socket are up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"node exited with code {proc.returncode} before it was ready")
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout_s:.0f}s")


def stop_all(nodes: list[LocalNode], grace_s: float = 60.0) -> None:
    """SIGTERM every node (clean stop), wait, then SIGKILL each process group."""
    for n in nodes:
        if n.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for n in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            n.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    reap_groups(nodes)


def reap_groups(nodes: list[LocalNode]) -> None:
    for n in nodes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(n.proc.pid, signal.SIGKILL)  # the node's session: DHT process, p2pd, reaper
        with contextlib.suppress(subprocess.TimeoutExpired):
            n.proc.wait(timeout=10)


def _show_progress(nodes: list[LocalNode]) -> None:
    for n in nodes:
        for r in n.follow():
            if r.get("event") == "outer":
                console.print(
                    f"{n.id:>8}  round {r['round']:>3}  {r['status']:<7} step {r['step']:>5}  "
                    f"loss {r['loss']:.3f}  val {r['val_loss']:.3f}  group {r['group_size']}  "
                    f"sent {r['bytes_sent'] / 1e6:7.1f} MB"
                )
            elif r.get("event") in ("resync", "resync_failed", "checkpoint_failed"):
                console.print(f"{n.id:>8}  {r['event']}: {r.get('reason', r.get('error', ''))}")


def summarize(nodes: list[LocalNode], wall_s: float) -> Table:
    table = Table(title=f"loco swarm: {len(nodes)} nodes, {wall_s:.0f} s wall time")
    for col in ("node", "exit", "rounds ok/skip/resync", "val start", "val end", "sent MB", "recv MB",
                "last weights_hash"):
        table.add_column(col)
    total_sent = 0
    for n in nodes:
        start, last, counts = n.start or {}, n.last or {}, n.outcomes
        total_sent += last.get("bytes_sent", 0)
        table.add_row(
            n.id, str(n.proc.returncode), f"{counts['ok']}/{counts['skipped']}/{counts['resync']}",
            f"{start.get('val_loss', float('nan')):.3f}", f"{last.get('val_loss', float('nan')):.3f}",
            f"{last.get('bytes_sent', 0) / 1e6:.1f}", f"{last.get('bytes_recv', 0) / 1e6:.1f}",
            str(last.get("weights_hash", "-")),
        )
    table.caption = f"total bytes exchanged (sent by all nodes): {total_sent / 1e6:.1f} MB"
    return table


def node_devices(cfg: Config, n: int) -> list[str] | None:
    """With node.device auto or cuda on a machine with GPUs: each node's own device (one GPU
    per node, or swarm.nodes_per_gpu per GPU). None: every node keeps the configured one."""
    if cfg.node.device not in ("auto", "cuda"):
        return None
    from .devices import local_gpus, swarm_devices  # imports torch: only when it matters

    gpus = local_gpus()
    return swarm_devices(n, gpus, cfg.swarm.nodes_per_gpu, cfg.node.nproc_per_node) if gpus else None


def run_swarm(cfg: Config, n: int, out: Path, config_path: str | None, overrides: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides)
    if cfg.node.threads == 0:  # share the cores instead of oversubscribing them N times
        overrides.append(f"node.threads={max(1, (os.cpu_count() or 1) // (n * cfg.node.nproc_per_node))}")
    if cfg.swarm.wait_for_peers == 0:  # start training together, not as a trickle of late joiners
        overrides.append(f"swarm.wait_for_peers={n - 1}")
    devices = node_devices(cfg, n)
    nodes: list[LocalNode] = []
    started = time.monotonic()
    interrupted = False

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    # explicit handlers: a launcher started in the background of a script inherits SIGINT
    # ignored, and Ctrl-C / SIGINT must still stop every node
    env = launch_env(cfg.swarm)
    previous = signal.signal(signal.SIGTERM, on_term)
    previous_int = signal.signal(signal.SIGINT, on_term)
    forks = ForkServer()  # the nodes' imports, once
    try:
        # all at once: the others load torch, the model and the data while node0 starts the
        # swarm, and join through the file node0 writes once its DHT is up
        first = out / "nodes" / "node0.json"
        for i in range(n):
            node_id = f"node{i}"
            (out / "nodes" / f"{node_id}.json").unlink(missing_ok=True)
            log_path = out / "logs" / f"{node_id}.log"
            own = [*overrides, f"node.device='{devices[i]}'"] if devices else list(overrides)
            if cfg.node.metrics_port:  # one port each: node i serves /metrics on the given port + i
                own.append(f"node.metrics_port={cfg.node.metrics_port + i}")
            cmd = node_command(node_id, out, config_path, own, None, first if i > 0 else None)
            nodes.append(LocalNode(node_id, spawn(cmd, log_path, env, forks), log_path,
                                   out / "metrics" / f"{node_id}.jsonl"))
        wait_for_file(first, nodes[0].proc, timeout_s=180)
        console.print(f"swarm started by node0; logs and metrics in {out}")
        while any(x.proc.poll() is None for x in nodes):
            _show_progress(nodes)
            time.sleep(1.0)
        _show_progress(nodes)
    except KeyboardInterrupt:
        interrupted = True
        console.print("stopping all nodes (checkpointing)...")
        stop_all(nodes)
        _show_progress(nodes)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]swarm failed to start: {exc}[/red]")
        stop_all(nodes, grace_s=10)
        return 1
    finally:
        reap_groups(nodes)
        forks.close()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    console.print(summarize(nodes, time.monotonic() - started))
    failed = [x.id for x in nodes if x.proc.returncode != 0]
    if failed and not interrupted:
        console.print(f"[red]nodes failed: {', '.join(failed)} (see {out / 'logs'})[/red]")
        return 1
    return 0
