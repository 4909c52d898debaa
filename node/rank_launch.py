"""Starting a node of several processes (node.nproc_per_node > 1).

``loco node start --nproc-per-node N`` starts the N ranks itself (``launch_ranks``: forked
by torch's process starting from one fork server that imported torch, hivemind and loco once,
a TCPStore this process serves for their rendezvous, so no port is guessed); ``torchrun --nproc-per-node N --no-python loco node start ...`` starts them the
way torchrun does (``under_torchrun``: RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment). Either way every rank runs ``run_rank``: rank 0 the daemon's ``Node``, the
others ``FollowerNode``. A rank that fails ends the node: the launcher stops the other ranks
(rank 0 leaves the swarm on its way out) and exits non-zero; a restart with the same --out
resumes from rank 0's checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .devices import rank_device
from .prefork import PRELOAD

log = logging.getLogger(__name__)

RANK_TIMEOUT_S = 900.0
"""How long a rank waits for the others inside one collective: rank 0 may spend the
swarm's bootstrap, its join timeout and a round's all-reduce between two (a rank that dies
is noticed at once: its connections close)."""


def under_torchrun() -> tuple[int, int] | None:
    """(rank, world size) when a launcher such as torchrun started this process as one rank
    of several; None otherwise."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    world = int(env["WORLD_SIZE"])
    return (int(env["RANK"]), world) if world > 1 else None


def _signal_handler(stop: threading.Event, leads: bool) -> Callable[[int, Any], None]:
    """Rank 0 stops the node cleanly at the first SIGINT/SIGTERM (as a one-process node
    does); the other ranks wait for it to say so. A second signal stops waiting."""
    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if leads:
            log.warning("got %s: finishing the round, checkpointing, leaving", signal.Signals(signum).name)

    return on_signal


def run_rank(rank: int, world: int, cfg: Config, out: Path, store: Any | None = None) -> int:
    """One rank of a node: join the node's process group (through ``store``, or the
    environment under torchrun), then run rank 0's ``Node`` or a ``FollowerNode``."""
    from loco import Ranks

    from .daemon import Node
    from .follower_node import FollowerNode
    from .runtime import default_node_id

    cfg = cfg.model_copy(update={"node": cfg.node.model_copy(update={"nproc_per_node": world})})
    backend = "nccl" if rank_device(cfg.node.device, rank).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank_device(cfg.node.device, rank))
    timeout = datetime.timedelta(seconds=RANK_TIMEOUT_S)
    if store is None:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        ranks = Ranks()
        stop = threading.Event()
        signal.signal(signal.SIGINT, _signal_handler(stop, ranks.leads))
        signal.signal(signal.SIGTERM, _signal_handler(stop, ranks.leads))
        if ranks.leads:
            code = Node(cfg, out, stop, ranks=ranks).run()
        else:
            code = FollowerNode(cfg, cfg.node.id or default_node_id(out), ranks, stop, out).run()
        # (a normal end: every rank is past the node's last collective, or it would have
        # failed in it) none tears the group down while another's last op may still finish
        # on its sockets: that aborted a rank in gloo's C++ ("terminate called without an
        # active exception")
        dist.barrier()
        return code
    finally:
        dist.destroy_process_group()


def _spawned_rank(index: int, world: int, cfg: Config, out: Path, port: int, verbose: bool) -> None:
    """The entry of a rank ``launch_ranks`` started (forked from the fork server)."""
    from .cli import setup_logging

    setup_logging(verbose)
    store = dist.TCPStore("127.0.0.1", port, world_size=world + 1, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    try:
        code = run_rank(index, world, cfg, out, store)
    except (ConfigError, ConnectionError, CheckpointError) as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        code = 1
    sys.exit(code)


def launch_ranks(cfg: Config, out: Path, verbose: bool) -> int:
    """Start the node's ``cfg.node.nproc_per_node`` ranks and wait for them. SIGINT/SIGTERM
    go on to every rank (rank 0 stops the node cleanly; the others follow it). The exit code:
    0 when every rank finished, else 1."""
    world = cfg.node.nproc_per_node
    store = dist.TCPStore("127.0.0.1", 0, world_size=world + 1, is_master=True, wait_for_workers=False)
    # forked from one server process that imported torch, hivemind and loco (multiprocessing's
    # forkserver, a fresh interpreter: nothing of this process's threads or CUDA), not N
    # fresh interpreters that each import them
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    ctx = mp.start_processes(_spawned_rank, args=(world, cfg, out, store.port, verbose), nprocs=world, join=False,
                             start_method="forkserver")

    def forward(signum: int, _frame: Any) -> None:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not ctx.join(timeout=0.5, grace_period=60):
            pass
    except mp.ProcessExitedException as exc:
        log.error("node stopped: rank %d exited with code %s", exc.error_index, exc.exit_code)
        return 1
    except mp.ProcessRaisedException as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.error("node stopped: rank %d failed (%s)", exc.error_index, first)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
