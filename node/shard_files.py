"""Checkpoints of a sharded node (node.parallel = "fsdp"): one file per rank.

Rank 0's ``<node>.safetensors`` holds what the node has once (the outer algorithm's state,
the position, the sampler and RNG streams) and, instead of the model and the inner AdamW
state, ``trainer.shards = {"tag", "ranks"}``. Every rank writes its own shards of both to
``<node>.shards/rank<r>.safetensors`` with the same tag, in its own background writer (no
rank gathers the model). Each file is written atomically and rotated like any checkpoint,
at least one previous version kept: a node killed between two ranks' writes leaves a
newest main file whose tag some rank file lacks, and the previous main file's tag is then
complete everywhere (``complete_set`` picks the newest such set).

A rank file's tensors are the rank's local pieces of each DTensor (FSDP2 shards dim 0,
``torch.chunk``'s split); ``layout`` records each tensor's sharded dim and global shape, so
``assemble_model`` rebuilds the whole model from every rank's file (``loco export``)
without a process group. Resuming needs the same number of ranks.

torch.distributed's FSDP and DTensor modules are imported where a sharded model is at hand
(1.5 s of every node process's start otherwise; the file helpers need neither).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import torch

from .checkpoint import SUFFIX, CheckpointError, checkpoint_summary, load_checkpoint, versions


def shards_folder(main: Path) -> Path:
    """Where the rank files of the checkpoint ``main`` (``<node>.safetensors``) live."""
    return main.with_name(main.name[: -len(SUFFIX)] + ".shards")


def versions_kept(keep: int) -> int:
    """The previous versions a sharded node keeps of each file (``train.keep_checkpoints``,
    one at least: see above)."""
    return max(1, keep)


def rank_file(main: Path, rank: int) -> Path:
    return shards_folder(main) / f"rank{rank}{SUFFIX}"


def new_tag(step: int) -> str:
    """A name shared by the files of one checkpoint (the step, and a random part: a node
    restarted from an older checkpoint reaches the same step again)."""
    return f"step{step}-{secrets.token_hex(4)}"


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP module of ``model`` back to its shards: after a forward without a backward
    (an evaluation) the root keeps its parameters whole, and those are other tensors than
    the sharded ones the inner optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _local(t: torch.Tensor) -> tuple[torch.Tensor, int | None, list[int]]:
    """A tensor's local piece, the dim it is sharded on (None: whole on every rank) and its
    global shape."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(t, DTensor):
        dims = [p.dim for p in t.placements if isinstance(p, Shard)]
        return t.to_local().detach(), (dims[0] if dims else None), list(t.shape)
    return t.detach(), None, list(t.shape)


def local_state(model: torch.nn.Module, opt: torch.optim.Optimizer, tag: str, rank: int,
                ranks: int) -> dict[str, Any]:
    """This rank's shards of the model and of the inner AdamW state (live tensors: copy them
    before handing them to a writer), keyed by parameter name."""
    reshard(model)
    names = {p: n for n, p in model.named_parameters()}
    weights, layout = {}, {}
    for name, t in model.state_dict().items():
        weights[name], dim, shape = _local(t)
        layout[name] = {"dim": dim, "shape": shape}
    moments = {}
    for p, st in opt.state.items():
        moments[names[p]] = {k: (_local(v)[0] if isinstance(v, torch.Tensor) and v.dim() else v)
                             for k, v in st.items()}
    return {"tag": tag, "rank": rank, "ranks": ranks, "model": weights, "opt": moments, "layout": layout}


@torch.no_grad()
def load_local_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A rank file's shards into the sharded ``model`` and its ``opt`` (this rank's pieces;
    ValueError where a name or a shape differs: another model or another sharding)."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    live = model.state_dict()
    missing = sorted(set(live) - set(state["model"]))
    if missing:
        raise ValueError(f"the rank file has no {missing[0]!r}")
    for name, t in live.items():
        target = t.to_local() if isinstance(t, DTensor) else t
        saved = state["model"][name]
        if tuple(saved.shape) != tuple(target.shape):
            raise ValueError(f"{name}: the rank file's shard has shape {tuple(saved.shape)}, this rank's "
                             f"{tuple(target.shape)}")
        target.copy_(saved)
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    for name, p in model.named_parameters():
        saved = state["opt"].get(name)
        if saved is None:
            opt.state.pop(p, None)
            continue
        entry = {}
        for key, value in saved.items():
            if key == "step":
                entry[key] = torch.as_tensor(value, dtype=torch.float32,
                                             device=p.to_local().device if on_device else None).clone()
            elif isinstance(p, DTensor):
                entry[key] = DTensor.from_local(value.to(p.to_local().device), p.device_mesh, p.placements,
                                                shape=p.shape, stride=p.stride())
            else:
                entry[key] = value.to(p.device, copy=True)
        opt.state[p] = entry


def _tag_of(path: Path) -> str | None:
    try:
        return checkpoint_summary(path).get("tag")
    except CheckpointError:
        return None


def _tags_by_rank(main: Path, ranks: int) -> list[dict[str | None, Path]]:
    """For each rank, its files' tags and the newest file with each."""
    return [{_tag_of(p): p for p in reversed(versions(rank_file(main, r))) if p.exists()} for r in range(ranks)]


def complete_set(main: Path, state: dict[str, Any], used: Path, ranks: int,
                 ) -> tuple[dict[str, Any], Path, list[Path]]:
    """``state``, read from ``used`` (``main`` or one of its previous versions), or the newest
    older version whose tag every rank's file has in one of its versions: (its state, its
    file, the rank files in rank order). CheckpointError when none is complete, or when they
    were written by a node of another rank count."""
    tags_by_rank = _tags_by_rank(main, ranks)
    mains = versions(main)
    for path in mains[mains.index(used) if used in mains else 0:]:
        if path != used:
            state = load_checkpoint(path)
        shards = state["trainer"]["shards"]
        if int(shards["ranks"]) != ranks:
            raise CheckpointError(f"checkpoint {path} was written by a node of {shards['ranks']} ranks, this one "
                                  f"has {ranks}: start it with --nproc-per-node {shards['ranks']} (or export it: "
                                  "loco export)")
        files = [tags.get(shards["tag"]) for tags in tags_by_rank]
        if all(files):
            return state, path, files
    raise CheckpointError(f"no checkpoint of {main.name} has every rank's shards (rank files in "
                          f"{shards_folder(main)}): the node was stopped while writing them; move them away to "
                          "start from the swarm's state")


def rank_files_of(main: Path, tag: str, ranks: int) -> list[Path]:
    """The rank files that hold the shards of ``tag`` (CheckpointError naming the first
    rank that has none)."""
    found = [tags.get(tag) for tags in _tags_by_rank(main, ranks)]
    if None in found:
        raise CheckpointError(f"{shards_folder(main)} has no file of rank {found.index(None)} with the shards "
                              f"of {main.name} ({tag})")
    return found


def assemble_model(main: Path, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The whole model's state dict from the rank files of the sharded checkpoint ``main``
    (whose ``state`` was read): each sharded tensor's pieces concatenated in rank order."""
    shards = state["trainer"]["shards"]
    parts = []
    for path in rank_files_of(main, shards["tag"], int(shards["ranks"])):
        part = load_checkpoint(path)
        if part is None:
            raise CheckpointError(f"{path} disappeared while it was read")
        parts.append(part)
    whole = {}
    for name, info in parts[0]["layout"].items():
        pieces = [p["model"][name] for p in parts]
        t = pieces[0] if info["dim"] is None else torch.cat(pieces, dim=int(info["dim"]))
        if list(t.shape) != list(info["shape"]):
            raise CheckpointError(f"{name}: the rank files' pieces make shape {list(t.shape)}, the model's is "
                                  f"{info['shape']}")
        whole[name] = t
    return whole
