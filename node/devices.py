"""Which torch device a node trains on, and how a local swarm shares a machine's GPUs."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(spec: str) -> torch.device:
    """node.device -> a torch.device that exists here (clear error if it does not)."""
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if count == 0:
        raise ConfigError(f"node.device = {spec!r}, but torch sees no CUDA device here "
                          f"(torch {torch.__version__}); use 'auto' or 'cpu'")
    if index >= count:
        raise ConfigError(f"node.device = {spec!r}, but this machine has {count} CUDA device(s) (0..{count - 1})")
    return torch.device("cuda", index)


def rank_device(spec: str, rank: int) -> torch.device:
    """The device of rank ``rank`` of a node of several processes: node.device's GPU plus the
    rank (cuda: GPUs 0, 1, ...; cuda:N: N, N+1, ...), or the CPU for every rank."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    first = int(spec.split(":", 1)[1]) if ":" in spec else 0
    try:
        return resolve_device(f"cuda:{first + rank}")
    except ConfigError as exc:
        raise ConfigError(f"rank {rank} of node.nproc_per_node with node.device = {spec!r} needs GPU "
                          f"{first + rank}: {exc}") from None


def swarm_devices(nodes: int, gpus: int, nodes_per_gpu: int = 1, ranks: int = 1) -> list[str]:
    """The device of each node of a local swarm: one GPU per node by default, or
    ``nodes_per_gpu`` nodes per GPU; more nodes than that wrap around the GPUs. A node of
    ``ranks`` processes takes that many GPUs from its device on."""
    if gpus <= 0:
        return ["cpu"] * nodes
    if ranks > 1:
        if nodes * ranks > gpus:
            raise ConfigError(f"{nodes} nodes of node.nproc_per_node = {ranks} processes need {nodes * ranks} "
                              f"GPUs; this machine has {gpus}")
        return [f"cuda:{i * ranks}" for i in range(nodes)]
    return [f"cuda:{(i // nodes_per_gpu) % gpus}" for i in range(nodes)]


def local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 autocast needs hardware support on GPUs (Ampere or newer)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision = 'bf16', but {torch.cuda.get_device_name(device)} does not support bf16")
