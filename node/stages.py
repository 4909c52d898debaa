"""A model cut into pipeline stages (its ``loco.PipelineParts``), and the whole model put
back together.

Stage s holds a contiguous group of blocks; stage 0 also holds the embedding, the head and
the loss. Every node builds the full model from the shared seed and keeps what its stage
holds, so the kept parameters are bit-identical to the same parameters of a single-process
model, and their state-dict keys are the full model's: one replica's state dict per stage
loads into a whole model.
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

from loco.pipeline_parts import PipelineParts, pipeline_parts

from .config import ConfigError, ModelConfig
from .model import build_model, unique_parameters


def stage_blocks(n_layer: int, stages: int) -> list[range]:
    """Blocks of each stage: contiguous, sizes differing by at most one; stage 0, which also
    runs the embedding and the head, gets the smaller share."""
    base, extra = divmod(n_layer, stages)
    sizes = [base + (1 if s >= stages - extra else 0) for s in range(stages)]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def model_parts(cfg: ModelConfig, split: str | None = None) -> tuple[nn.Module, PipelineParts]:
    """The whole model (the built-in GPT or ``model.factory``'s) and its pipeline parts;
    ConfigError (one line) if it does not declare them."""
    model = build_model(cfg)
    try:
        return model, pipeline_parts(model, split)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class StageModel:
    """One stage of a model: ``embed`` (stage 0: the embedding and its blocks), ``blocks``
    (any stage), ``loss`` (stage 0: the head and cross-entropy)."""

    def __init__(self, cfg: ModelConfig, stage: int, stages: int, seed: int, device: torch.device | str = "cpu",
                 split: str | None = None):
        torch.manual_seed(seed)  # the same init as every other node and as a single process
        model, parts = model_parts(cfg, split)
        self.n_blocks = len(parts.blocks)
        if stages > self.n_blocks:
            raise ConfigError(f"pipeline.stages ({stages}) exceeds the model's {self.n_blocks} blocks: "
                              f"every stage needs at least one")
        self.stage = stage
        self.block_ids = stage_blocks(self.n_blocks, stages)[stage]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # what travels between stages: [B, T, width]
            self.width = int(parts.embed(torch.zeros(1, 1, dtype=torch.long)).shape[-1])
        self.device = torch.device(device)
        self._blocks = [parts.blocks[i].to(self.device) for i in self.block_ids]
        self._embed = parts.embed.to(self.device) if stage == 0 else None
        self._head = parts.head.to(self.device) if stage == 0 else None
        kept = [m for m in (*self._blocks, self._embed, self._head) if m is not None]
        # the full model's names for what this stage holds (after the move: buffers are new tensors)
        held = {id(t) for m in kept for t in m.state_dict(keep_vars=True).values()}
        self._named = {k: t for k, t in model.state_dict(keep_vars=True).items() if id(t) in held}
        owned = {id(p) for m in kept for p in m.parameters()}
        self.params = [p for p in unique_parameters(model) if id(p) in owned]
        self._kept = kept  # (the rest of the model goes with ``model``)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.blocks(self._embed(idx))

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._blocks:
            x = block(x)
        return x

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def train(self, mode: bool = True) -> None:
        for m in self._kept:
            m.train(mode)

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's parameters under the whole model's names (a tied one under each)."""
        return [(k, t) for k, t in self._named.items() if isinstance(t, nn.Parameter)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's tensors under the whole model's names."""
        return {k: t.detach() for k, t in self._named.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self._named) - set(state))
        if missing:
            raise KeyError(f"stage {self.stage} state lacks {missing[:4]}")
        with torch.no_grad():
            for k, t in self._named.items():
                t.copy_(state[k])


def assemble(cfg: ModelConfig, stage_states: Iterable[dict[str, torch.Tensor]]) -> nn.Module:
    """A whole model from one state dict per stage (every key must be covered exactly)."""
    merged: dict[str, torch.Tensor] = {}
    for state in stage_states:
        merged.update({k: v.to("cpu") for k, v in state.items()})
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    if missing or unexpected:
        raise ValueError(f"stage checkpoints do not make a whole model: missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}")
    return model


@torch.no_grad()
def loss_skipping(parts: PipelineParts, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  skip_blocks: set[int]) -> float:
    """Validation loss of a model (its pipeline parts) with the blocks in ``skip_blocks``
    left out (the residual stream passes them by, as a microbatch that skips their stage
    does in training)."""
    for m in (parts.embed, parts.head, *parts.blocks):
        m.eval()
    losses = []
    for x, y in batches:
        h = parts.embed(x)
        for i, block in enumerate(parts.blocks):
            if i not in skip_blocks:
                h = block(h)
        logits = parts.head(h)
        losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))))
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
    parts = pipeline_parts(model, cfg.pipeline.split)
    _, val = load_corpus(cfg.data)
    batches = validation_batches(val, cfg.model.block_size, cfg.data.batch_size, cfg.data.val_batches,
                                 cfg.train.seed)
    n_blocks = len(parts.blocks)
    blocks = stage_blocks(n_blocks, stages)
    rows = []
    for k in range(stages - 1):
        for skipped in itertools.combinations(range(1, stages), k):
            skip_blocks = {b for s in skipped for b in blocks[s]}
            rows.append({"skipped_stages": list(skipped), "skipped_blocks": len(skip_blocks),
                         "kept_share": 1 - len(skip_blocks) / n_blocks,
                         "val_loss": loss_skipping(parts, batches, skip_blocks)})
    return rows
