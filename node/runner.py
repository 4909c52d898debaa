"""`loco run`: every variant of an experiment as a real local swarm, faults included.

Each variant gets its own folder (OUT/<variant>/, the same layout as `loco swarm`) and the
same seeds, data and budget. The runner starts the nodes, carries out the fault schedule
(recording every event in OUT/<variant>/metrics/faults.jsonl), waits for the nodes to
finish, and writes the report. Timings come from the nodes' own metrics, so the runner's
overhead is not in the figures.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from rich.console import Console

from .config import config_to_dict
from .config_layers import without_env_overrides
from .experiment import Experiment, Fault, Variant, node_config
from .metrics import MetricsFollower, MetricsWriter
from .prefork import ForkServer
from .report import write_report
from .runtime import write_json_atomic
from .swarm import (
    LocalNode,
    launch_env,
    node_command,
    node_devices,
    reap_groups,
    spawn,
    stop_all,
    wait_for_file,
)

console = Console(highlight=False)


class VariantRun:
    def __init__(self, exp: Experiment, variant: Variant, out: Path):
        self.exp = exp
        self.variant = variant
        self.out = out
        self.n = exp.experiment.nodes
        self.nodes: dict[int, LocalNode] = {}
        self.epoch = time.time()
        self.faults = MetricsWriter(out / "metrics" / "faults.jsonl", "runner")
        self.pending = sorted(exp.fault, key=lambda f: (f.at_s if f.at_s is not None else 1e18))
        self.resume_at: list[tuple[float, int]] = []  # (time, node) for SIGCONT after a pause
        # node -> the join file its restart waits on: a restart is started as soon as the node
        # is down, loads its model, data and checkpoint, and joins when the fault fires (on a
        # busy machine that loading takes seconds, by when the others may have finished; a
        # fresh interpreter's imports took 10-20 s more, which the fork server saves)
        self.staged: dict[int, Path] = {}
        self._followers: dict[int, MetricsFollower] = {}  # node -> its metrics file, followed
        self._rounds: dict[int, int] = {}  # node -> the highest round it has recorded
        # restarts keep the key; LOCO_SECTION__KEY variables are in the experiment's base
        # already, and must not override each variant's settings in the nodes again
        self.env = without_env_overrides(launch_env(node_config(exp, variant, 0, self.epoch).swarm))
        self.forks: ForkServer | None = None  # the nodes' imports, once (while the variant runs)

    def _config_path(self, i: int) -> Path:
        cfg = node_config(self.exp, self.variant, i, self.epoch)
        data = config_to_dict(cfg)
        data["swarm"]["wait_for_peers"] = data["swarm"]["wait_for_peers"] or self.n - 1
        devices = node_devices(cfg, self.n)
        if devices:
            data["node"]["device"] = devices[i]
        if cfg.node.metrics_port:  # one port each: node i serves /metrics on the given port + i
            data["node"]["metrics_port"] = cfg.node.metrics_port + i
        if not data["node"]["threads"]:
            data["node"]["threads"] = max(1, (os.cpu_count() or 1) // (self.n * cfg.node.nproc_per_node))
        path = self.out / "node-configs" / f"node{i}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))
        return path

    def _start(self, i: int, peer: str | None, join_file: Path | None = None) -> None:
        node_id = f"node{i}"
        (self.out / "nodes" / f"{node_id}.json").unlink(missing_ok=True)
        cmd = node_command(node_id, self.out, str(self._config_path(i)), [], peer, join_file)
        self.nodes[i] = LocalNode(node_id, spawn(cmd, self.out / "logs" / f"{node_id}.log", self.env, self.forks),
                                  self.out / "logs")

    def _live_peer(self, exclude: int) -> str | None:
        for i, n in self.nodes.items():
            info = self.out / "nodes" / f"node{i}.json"
            if i != exclude and n.proc.poll() is None and info.exists():
                return json.loads(info.read_text())["maddrs"][0]
        return None

    def _round_reached(self, node: int, rnd: int) -> bool:
        follower = self._followers.setdefault(node, MetricsFollower(self.out / "metrics" / f"node{node}.jsonl"))
        for r in follower.new_records():  # (only what was appended since the last look)
            if r.get("event") == "outer":
                self._rounds[node] = max(self._rounds.get(node, -1), r.get("round", -1))
        return self._rounds.get(node, -1) >= rnd

    def _stage_restarts(self) -> None:
        for f in self.pending:
            node = self.nodes.get(f.node)
            if f.action != "restart" or node is None or node.proc.poll() is None:
                continue
            self.staged.pop(f.node, None)  # (a staged restart that gave up waiting is staged again)
            join = self.out / "nodes" / f"node{f.node}.restart.json"
            join.unlink(missing_ok=True)
            self._start(f.node, None, join)
            self.staged[f.node] = join

    def _due(self, f: Fault) -> bool:
        if f.action == "restart":
            node = self.nodes.get(f.node)
            if node is not None and node.proc.poll() is None and f.node not in self.staged:
                return False  # still running (or still shutting down after a stop): wait for it
        if f.at_s is not None:
            return time.time() - self.epoch >= f.at_s
        if f.action == "restart":  # the target is down: count the swarm's rounds instead
            return any(self._round_reached(i, f.at_round or 0) for i in self.nodes if i != f.node)
        return self._round_reached(f.node, f.at_round or 0)

    def _apply(self, f: Fault) -> None:
        node = self.nodes.get(f.node)
        record = {"action": f.action, "target": f"node{f.node}", "elapsed_s": time.time() - self.epoch}
        alive = node is not None and node.proc.poll() is None
        if f.action == "cut":
            record["peer"] = f"node{f.peer}"
            record["duration_s"] = f.duration_s  # applied by both nodes' shapers from their config
        elif f.action == "restart":
            staged = self.staged.pop(f.node, None)
            peer = self._live_peer(exclude=f.node)
            if staged is not None and alive and peer is not None:
                write_json_atomic(staged, {"maddrs": [peer]})  # it joins now
            elif staged is None and alive:
                record["note"] = "node was running; not restarted"
            else:  # down, or staged with nobody to join through (it starts the swarm anew)
                if staged is not None:
                    stop_all([node], grace_s=30)
                self._start(f.node, peer)
        elif not alive:
            record["note"] = "node was not running"
        elif f.action == "kill":
            node.proc.send_signal(signal.SIGKILL)
        elif f.action == "stop":
            node.proc.send_signal(signal.SIGTERM)
        elif f.action == "pause":
            os.killpg(node.proc.pid, signal.SIGSTOP)
            self.resume_at.append((time.time() + f.duration_s, f.node))
            record["duration_s"] = f.duration_s
        self.faults.write("fault", **record)
        console.print(f"  [{self.variant.name}] fault at {record['elapsed_s']:.0f}s: {f.action} node{f.node}")

    def run(self) -> bool:
        """True if the variant finished by itself within the experiment's timeout."""
        self.out.mkdir(parents=True, exist_ok=True)
        console.print(f"variant {self.variant.name}: starting {self.n} nodes")
        finished = False
        self.forks = ForkServer()
        try:
            self._start(0, None)
            first = self.out / "nodes" / "node0.json"
            for i in range(1, self.n):  # they join through node0's file once it is up
                self._start(i, None, first)
            wait_for_file(first, self.nodes[0].proc, 180)
            deadline = time.time() + self.exp.experiment.timeout_s
            while time.time() < deadline:
                self._stage_restarts()
                for f in [f for f in self.pending if self._due(f)]:
                    self.pending.remove(f)
                    self._apply(f)
                for t, i in [x for x in self.resume_at if x[0] <= time.time()]:
                    self.resume_at.remove((t, i))
                    os.killpg(self.nodes[i].proc.pid, signal.SIGCONT)
                    self.faults.write("fault", action="resume", target=f"node{i}",
                                      elapsed_s=time.time() - self.epoch)
                running = [n for n in self.nodes.values() if n.proc.poll() is None]
                if not running and not self.resume_at and not any(f.action == "restart" for f in self.pending):
                    finished = True
                    break
                time.sleep(0.5)
            for f in self.pending:  # scheduled past the end of the run: say so, never silently
                self.faults.write("fault", action=f.action, target=f"node{f.node}", elapsed_s=time.time() - self.epoch,
                                  fired=False, note="not fired: the run ended before " + (
                                      f"{f.at_s:.0f} s" if f.at_s is not None else f"round {f.at_round}"))
                console.print(f"  [{self.variant.name}] fault {f.action} node{f.node} never fired: the run ended first")
        finally:
            for _, i in self.resume_at:  # never leave a stopped process behind
                os.killpg(self.nodes[i].proc.pid, signal.SIGCONT)
            stop_all(list(self.nodes.values()), grace_s=60)
            reap_groups(list(self.nodes.values()))
            self.forks.close()
            self.faults.close()
        return finished


def run_experiment(exp: Experiment, out: Path, source: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps({"source": source, **exp.model_dump(mode="json")}, indent=2))
    ok = True
    for variant in exp.variant:
        ok &= VariantRun(exp, variant, out / variant.name).run()
    report = write_report(out)
    console.print(f"report: {report}")
    return 0 if ok else 1
