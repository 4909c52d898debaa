"""One stage's trainable state: its blocks (from the shared seed), their inner AdamW and,
with sync = diloco or noloco, the outer optimizer that ``ReplicaSync`` attaches. In the
forms that leave the node: the tensors a joining replica is handed (bit-identical to this
one afterwards) and a checkpoint."""

from __future__ import annotations

from typing import Any

import torch

from loco.optim import DiLoCo, NoLoCo

from ..config import Config
from ..optstate import adam_step, adam_tensors, load_adam
from ..stages import StageModel


class StageState:
    def __init__(self, cfg: Config, stage: int, device: torch.device):
        o = cfg.optim
        self.cfg, self.stage, self.device = cfg, stage, device
        self.model = StageModel(cfg.model, stage, cfg.pipeline.stages, cfg.train.seed, device, cfg.pipeline.split)
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.inner_lr, betas=o.betas,
        )
        self.outer: DiLoCo | NoLoCo | None = None  # attached by ReplicaSync (sync = diloco / noloco)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.model.params

    def tensors(self) -> list[torch.Tensor]:
        """Weights, AdamW moments and (sync = diloco / noloco) the outer state."""
        tensors = [p.detach() for p in self.params] + adam_tensors(self.opt, self.params)
        return tensors + (self.outer.synchronized_tensors() if self.outer is not None else [])

    def snapshot(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """A host copy of :meth:`tensors` and the counts that go with them (training goes on
        while it is sent or written)."""
        meta = {"stage": self.stage, "adam_step": adam_step(self.opt, self.params),
                "outer_steps": self.outer.outer_steps if self.outer is not None else 0}
        return [t.detach().to("cpu", copy=True) for t in self.tensors()], meta

    def adopt(self, tensors: list[torch.Tensor], meta: dict[str, Any]) -> str | None:
        """Load a :meth:`snapshot`; what is wrong with it (None: loaded). A bad one changes nothing."""
        mine = self.tensors()
        if meta.get("stage") != self.stage:
            return f"state of stage {meta.get('stage')!r}, this node holds stage {self.stage}"
        steps = (meta.get("adam_step"), meta.get("outer_steps"))
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in steps):
            return f"adam_step/outer_steps are not counts: {steps}"
        if len(tensors) != len(mine) or any(t.dtype != m.dtype or t.shape != m.shape
                                            for t, m in zip(tensors, mine, strict=True)):
            return f"{len(tensors)} tensors that do not match this stage's {len(mine)}"
        n = len(self.params)
        with torch.no_grad():
            for p, t in zip(self.params, tensors[:n], strict=True):
                p.copy_(t)
        load_adam(self.opt, self.params, tensors[n:3 * n], meta["adam_step"])
        if self.outer is not None:
            self.outer.load_synchronized(tensors[3 * n:], meta["outer_steps"], reset_params=False)
        return None

    def checkpoint(self, iteration: int) -> dict[str, Any]:
        """The stage's weights for ``loco eval-skips`` and its whole state for a restart."""
        tensors, meta = self.snapshot()
        return {"pipeline": {"stage": self.stage, "stages": self.cfg.pipeline.stages},
                "model": self.model.state_dict(), "iteration": iteration,
                "stage_state": {"tensors": tensors, "meta": meta}, "model_config": self.cfg.model.model_dump()}

    def restore(self, checkpoint: dict[str, Any] | None) -> str | None:
        """Load a :meth:`checkpoint`; why it does not fit this stage (None: loaded)."""
        saved = (checkpoint or {}).get("stage_state")
        if saved is None:
            return "no stage state in it"
        if checkpoint["pipeline"] != {"stage": self.stage, "stages": self.cfg.pipeline.stages}:
            return f"it holds {checkpoint['pipeline']}, this node stage {self.stage} of {self.cfg.pipeline.stages}"
        return self.adopt(saved["tensors"], saved["meta"])
