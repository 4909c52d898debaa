"""FSDP2 inside a node of several processes (node.parallel = "fsdp"): the model's blocks
and its root sharded over the node's ranks with ``fully_shard``, the inner AdamW rebuilt on
the sharded parameters with the state it had, and the load of a gathered optimizer state
(what sharded nodes' checkpoints held before each rank wrote its own: node/shard_files.py).
torch.distributed.checkpoint's state-dict helpers do the layout work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def shard_model(model: torch.nn.Module, opt: torch.optim.Optimizer, group: Any, device: torch.device,
                make_optimizer: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """Shard ``model`` in place over ``group`` (every module of each ``nn.ModuleList``, the
    transformer's blocks, then the root) and return a new inner optimizer from
    ``make_optimizer`` holding ``opt``'s state, sharded like the parameters. Every rank must
    hold the same weights and state before (the node's rank 0 shares them)."""
    saved = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    mesh = DeviceMesh.from_group(group, device.type)
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = make_optimizer()
    if saved.get("state"):
        set_optimizer_state_dict(model, sharded, saved, options=StateDictOptions(full_state_dict=True))
    return sharded


def load_full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A gathered optimizer state (keyed by parameter names) into an unsharded model's
    optimizer."""
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
