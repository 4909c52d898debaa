"""The one place the daemon's config becomes library objects: a ``loco.Swarm`` from the
node and swarm sections, and the configured algorithm from the optim, compression and
collective sections, by keyword. Every algorithm's own options come from its section."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loco import CO2, DDP, DiLoCo, Follower, NoLoCo, OuterAlgorithm, Ranks, StreamingDiLoCo, Swarm

from .config import Config

ALGORITHMS: dict[str, type[OuterAlgorithm]] = {
    "diloco": DiLoCo, "streaming_diloco": StreamingDiLoCo, "noloco": NoLoCo, "co2": CO2, "ddp": DDP,
}


def averages_gradients(cfg: Config) -> bool:
    """The node's algorithm averages every step's gradients across nodes (DDP): the nodes'
    weights then stay identical only if every step's update is computed alike by each."""
    return ALGORITHMS[cfg.optim.algorithm].gradients_each_step


def open_swarm(cfg: Config, node_id: str, stop: threading.Event, identity: Path | None = None) -> Swarm:
    n, s = cfg.node, cfg.swarm
    return Swarm(s.run_id, s.initial_peers, s.key, insecure=s.insecure, node_id=node_id, listen_host=n.listen_host,
                 announce_host=n.announce_host, port=n.port, dht_port=n.dht_port, announce_ttl_s=s.announce_ttl_s,
                 bootstrap_timeout_s=s.bootstrap_timeout_s, network=cfg.network, stop=stop, identity=identity)


def _options(cfg: Config) -> dict[str, Any]:
    """The selected algorithm's own keyword arguments."""
    o = cfg.optim
    outer = {"outer_lr": o.outer_lr, "outer_momentum": o.outer_momentum, "nesterov": o.nesterov}
    return {
        "diloco": lambda: {**outer, "outer_state_device": o.outer_state_device},
        "streaming_diloco": lambda: {**outer, **o.streaming.model_dump()},
        "noloco": o.noloco.model_dump,
        "co2": o.co2.model_dump,
        "ddp": dict,
    }[o.algorithm]()


def build_algorithm(cfg: Config, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer,
                    swarm: Swarm | None, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                    join: bool = True, ranks: Ranks | None = None) -> OuterAlgorithm | Follower:
    """``ranks``: the node's processes (rank 0 passes its swarm, the others None and get
    a ``loco.Follower``)."""
    o = cfg.optim
    return ALGORITHMS[o.algorithm](
        model, inner_optimizer, swarm, inner_steps=o.inner_steps, compression=cfg.compression,
        timeouts=cfg.collective, join=join, join_timeout_s=cfg.swarm.join_timeout_s,
        wait_for_peers=cfg.swarm.wait_for_peers, seed=cfg.train.seed, on_event=on_event, ranks=ranks,
        rank_exchange=cfg.node.rank_exchange, **_options(cfg),
    )
