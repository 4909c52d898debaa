"""The built-in GPT cut into pipeline stages, and the whole model put back together.

Stage s holds a contiguous group of blocks; stage 0 also holds the token and position
embeddings, the final norm, the (tied) head and the loss. Every node builds the full model
from the shared seed and drops what its stage does not hold, so the kept parameters are
bit-identical to the same parameters of a single-process model, and their state-dict keys
are the full model's: one replica's state dict per stage loads into a whole GPT.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .model import GPT, unique_parameters


def stage_blocks(n_layer: int, stages: int) -> list[range]:
    """Blocks of each stage: contiguous, sizes differing by at most one; stage 0, which also
    runs the embedding and the head, gets the smaller share."""
    base, extra = divmod(n_layer, stages)
    sizes = [base + (1 if s >= stages - extra else 0) for s in range(stages)]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


class StageModel:
    """One stage of the GPT: ``embed`` (stage 0), ``blocks`` (any stage), ``loss`` (stage 0)."""

    def __init__(self, cfg: ModelConfig, stage: int, stages: int, seed: int, device: torch.device | str = "cpu"):
        torch.manual_seed(seed)  # the same init as every other node and as a single process
        gpt = GPT(cfg)
        self.stage = stage
        self.block_ids = stage_blocks(cfg.n_layer, stages)[stage]
        for i in range(cfg.n_layer):
            if i not in self.block_ids:
                gpt.blocks[i] = nn.Identity()
        if stage != 0:
            gpt.tok = gpt.pos = gpt.ln_f = gpt.head = None
        self.gpt = gpt.to(device)
        self.device = torch.device(device)
        self.params = unique_parameters(self.gpt)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        g = self.gpt
        x = g.tok(idx) + g.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.blocks(x)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i in self.block_ids:
            x = self.gpt.blocks[i](x)
        return x

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.gpt.head(self.gpt.ln_f(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def train(self, mode: bool = True) -> None:
        self.gpt.train(mode)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.gpt.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gpt.load_state_dict(state)


def assemble(cfg: ModelConfig, stage_states: Iterable[dict[str, torch.Tensor]]) -> GPT:
    """A whole GPT from one state dict per stage (every key must be covered exactly)."""
    merged: dict[str, torch.Tensor] = {}
    for state in stage_states:
        merged.update({k: v.to("cpu") for k, v in state.items()})
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    if missing or unexpected:
        raise ValueError(f"stage checkpoints do not make a whole model: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    return model


@torch.no_grad()
def loss_skipping(model: GPT, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], skip_blocks: set[int]) -> float:
    """Validation loss of ``model`` with the blocks in ``skip_blocks`` left out (the residual
    stream passes them by, as a microbatch that skips their stage does in training)."""
    model.eval()
    losses = []
    for x, y in batches:
        logits = model(x, skip=skip_blocks)
        losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))))
    return sum(losses) / len(losses)


def skip_evaluation(out: Path) -> list[dict[str, Any]]:
    """Validation loss of a pipeline run's model (OUT: its output folder) with every set of
    stages other than 0 left out, up to all but one of them: one row per set, the whole
    model first. Each stage's weights come from its replica with the smallest id."""
    from .checkpoint import SUFFIX, load_checkpoint
    from .config import build_config
    from .data import load_corpus, validation_batches

    per_stage: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
    stages = 0
    for path in sorted((out / "checkpoints").glob(f"*{SUFFIX}")):
        state = load_checkpoint(path)
        info = (state or {}).get("pipeline")
        if not info:
            continue
        stages = int(info["stages"])
        per_stage.setdefault(int(info["stage"]), (path.stem, state["model"]))
    if not per_stage:
        raise ValueError(f"{out / 'checkpoints'} holds no pipeline checkpoints")
    missing = sorted(set(range(stages)) - set(per_stage))
    if missing:
        raise ValueError(f"no checkpoint of stage(s) {missing} in {out / 'checkpoints'}")
    node = per_stage[0][0]
    cfg = build_config(json.loads((out / "config" / f"{node}.json").read_text()), f"{node}'s config")
    model = assemble(cfg.model, [state for _, state in per_stage.values()])
    _, val = load_corpus(cfg.data)
    batches = validation_batches(val, cfg.model.block_size, cfg.data.batch_size, cfg.data.val_batches,
                                 cfg.train.seed)
    blocks = stage_blocks(cfg.model.n_layer, stages)
    rows = []
    for k in range(stages - 1):
        for skipped in itertools.combinations(range(1, stages), k):
            skip_blocks = {b for s in skipped for b in blocks[s]}
            rows.append({"skipped_stages": list(skipped), "skipped_blocks": len(skip_blocks),
                         "kept_share": 1 - len(skip_blocks) / cfg.model.n_layer,
                         "val_loss": loss_skipping(model, batches, skip_blocks)})
    return rows
