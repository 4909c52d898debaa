"""The inner loop: model, inner AdamW, data stream, validation. No networking here."""

from __future__ import annotations

import inspect
import logging
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import loco

from .config import Config, ConfigError
from .data import BatchFeed, Sampler, check_corpus, load_corpus, node_seed, validation_batches
from .devices import check_precision, rank_device, resolve_device
from .lm_output import ModelOutputError, lm_loss, vocab_size_of
from .model import build_model, unique_parameters

log = logging.getLogger(__name__)


class Trainer:
    def _block_size(self, cfg: Config) -> int:
        """The context length: the model's own ``block_size`` attribute when it has one (a
        factory's model knows its context), else ``model.block_size``. A ``model.block_size``
        other than the default that the model contradicts is an error, never silently ignored
        (the value, not whether the key was set: a node of ``loco swarm`` or ``loco run``
        reads a config with every field written out)."""
        own = getattr(self.model, "block_size", None)
        if not isinstance(own, int) or isinstance(own, bool):
            return cfg.model.block_size
        if cfg.model.block_size != type(cfg.model).model_fields["block_size"].default and own != cfg.model.block_size:
            raise ConfigError(f"model.block_size = {cfg.model.block_size}, but the model built by model.factory "
                              f"has block_size = {own}: leave model.block_size out or make them agree")
        return own

    def __init__(self, cfg: Config, node_id: str, rank: int = 0, exact_clip: bool = False):
        """``rank``: this process's rank in a node of several (``distribute`` then makes it
        train with the others); each rank draws its own batches. ``exact_clip``: clip the
        gradients with a norm every layout computes alike (``loco.clip_gradients``: DDP across nodes,
        whose nodes may shard the model differently), not ``clip_grad_norm_``'s."""
        self.cfg = cfg
        self.rank = rank
        self.exact_clip = exact_clip
        self.device = resolve_device(cfg.node.device) if cfg.node.nproc_per_node == 1 else \
            rank_device(cfg.node.device, rank)
        check_precision(cfg.train.precision, self.device)
        # bf16 autocast for forward/backward only: parameters, gradients, AdamW state and
        # everything synchronized stay fp32
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.precision == "bf16")
        torch.manual_seed(cfg.train.seed)  # same init on every node: round 0 starts in sync
        self.model = build_model(cfg.model).to(self.device)
        self.params = unique_parameters(self.model)
        self.block_size = self._block_size(cfg)
        try:
            self.vocab_size = vocab_size_of(self.model)
        except ModelOutputError as exc:
            raise ConfigError(f"model: {exc}") from None
        train, val = load_corpus(cfg.data)
        check_corpus(train, val, self.block_size, self.vocab_size, cfg.data)
        seed = node_seed(cfg.train.seed, node_id, rank)
        self.sampler = Sampler(train, self.block_size, cfg.data.batch_size, seed)
        self.val = validation_batches(val, self.block_size, cfg.data.batch_size, cfg.data.val_batches,
                                      cfg.train.seed)
        self.opt = self._make_optimizer()
        self._check_output()
        # the module the inner steps run: compiled, or the model itself. Everything else
        # (state_dict, the outer algorithm, evaluation) uses ``self.model``: the compiled
        # wrapper shares its parameters and would only add a prefix to their names
        self.compiled = compile_wanted(cfg.train.compile, self.device)
        self.train_module: torch.nn.Module = self.model  # DistributedDataParallel's wrapper after distribute()
        self.processes = 1  # of the node, each on its own batch
        self.step_model: torch.nn.Module = torch.compile(self.model) if self.compiled else self.model
        self._compile_checked = not self.compiled
        self.batches = BatchFeed(self.sampler, self.device)
        self.step = 0
        self._last_loss = 0.0
        self._loss: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None  # losses since the last mean_loss(), on the device
        self._loss_count = 0
        self.tokens = 0
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        # fused: one kernel for the whole update on a GPU (the for-each default launches
        # several per parameter group); the same math and the same state_dict
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.inner_lr, betas=o.betas, fused=self.device.type == "cuda",
        )

    def distribute(self, group: Any) -> None:
        """Train together with the other ranks of the torch.distributed ``group`` (the node's
        processes), as node.parallel says: ddp (DistributedDataParallel averages the
        gradients of every step) or fsdp (FSDP2: each rank holds a shard of every block; the
        inner optimizer is rebuilt on the shards, with its state). They must hold the same
        weights and optimizer state now."""
        import torch.distributed as dist

        self.processes = dist.get_world_size(group)
        if self.cfg.node.parallel == "fsdp":
            from .sharding import shard_model

            self.opt = shard_model(self.model, self.opt, group, self.device, self._make_optimizer_on_shards)
            self.params = unique_parameters(self.model)
            self.train_module = self.model
            self.step_model = torch.compile(self.model) if self.compiled else self.model
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # the ranks' buffers are the same and training does not change them: syncing them
        # before every forward would only cost (the option's name changed in torch 2.13)
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in \
            inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers"
        self.train_module = DistributedDataParallel(self.model, device_ids=ids, process_group=group,
                                                    **{no_sync: False})
        self.step_model = torch.compile(self.train_module) if self.compiled else self.train_module

    def _make_optimizer_on_shards(self) -> torch.optim.Optimizer:
        self.params = unique_parameters(self.model)  # fully_shard replaced them with DTensors
        return self._make_optimizer()

    @property
    def sharded(self) -> bool:
        """The model is sharded over the node's ranks (fsdp): its state dicts, evaluation and
        checkpoints are collectives of every rank."""
        return self.processes > 1 and self.cfg.node.parallel == "fsdp"

    @torch.no_grad()
    def _check_output(self) -> None:
        """One validation window through the model: a forward that breaks the output
        contract (README, Models) is a one-line ConfigError now, not a crash mid-round."""
        x, y = self.val[0]
        try:
            with self.autocast:
                lm_loss(self.model, x[:1].to(self.device), y[:1].to(self.device), self.cfg.model.computes_loss)
        except ModelOutputError as exc:
            raise ConfigError(f"model: {exc}") from None

    def _lr(self) -> float:
        warm = self.cfg.optim.warmup_steps
        return self.cfg.optim.inner_lr * min(1.0, (self.step + 1) / warm) if warm else self.cfg.optim.inner_lr

    def train_step(self, sync: Callable[[], bool] | None = None, read_loss: bool = True) -> float | None:
        """One inner step. ``sync`` runs between backward and the update (DDP's gradient
        average); if it returns False the update is skipped. ``read_loss=False``: return
        None and leave the loss on the device (reading it waits for the device: the daemon
        reads it with ``last_loss()`` only when it records it)."""
        self.model.train()
        x, y = self.batches.next()
        for g in self.opt.param_groups:
            g["lr"] = self._lr()
        self.opt.zero_grad(set_to_none=True)
        loss = self._forward_backward(x, y)
        # the next batch is drawn and its copy queued while the device works on this one
        self.batches.prefetch()
        if sync is None or sync():
            if self.cfg.optim.grad_clip:
                clip = loco.clip_gradients if self.exact_clip else torch.nn.utils.clip_grad_norm_
                clip(self.params, self.cfg.optim.grad_clip)
            self.opt.step()
        self.step += 1
        self.tokens += x.numel() * self.processes
        self._loss = loss.detach()
        self._loss_sum = self._loss.clone() if self._loss_sum is None else self._loss_sum.add_(self._loss)
        self._loss_count += 1
        return self.last_loss() if read_loss else None

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._compile_checked:
            with self.autocast:
                loss = lm_loss(self.step_model, x, y, self.cfg.model.computes_loss)
            loss.backward()
            return loss
        # the first compiled step: where torch.compile fails (no compiler, an op it cannot
        # trace), "auto" trains eagerly instead; an explicit train.compile = true fails
        self._compile_checked = True
        try:
            return self._forward_backward(x, y)
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            if self.cfg.train.compile is True:
                raise ConfigError(f"train.compile = true, but torch.compile failed: {why}") from exc
            log.warning("torch.compile failed (%s); training without it (set train.compile = false to skip the "
                        "attempt)", why)
            self.compiled, self.step_model = False, self.train_module
            self.opt.zero_grad(set_to_none=True)
            return self._forward_backward(x, y)

    def mean_loss(self) -> float:
        """Mean loss of the inner steps since the last call (one host sync); NaN if none."""
        if self._loss_sum is None or not self._loss_count:
            return float("nan")
        value = float(self._loss_sum) / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        return value

    def last_loss(self) -> float:
        """The loss of the last inner step (a host sync on a GPU)."""
        value = float(self._loss) if self._loss is not None else float("nan")
        if not math.isfinite(value) and math.isfinite(self._last_loss):
            # not fatal: the outer algorithm restores the last synchronized state at the
            # round's end (a replica must not crash, nor offer NaN to the swarm)
            log.warning("training loss is %s at step %d; the weights are restored at the round's end", value,
                        self.step)
        self._last_loss = value
        return value

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for x, y in self.val:
            with self.autocast:
                loss = lm_loss(self.model, x.to(self.device), y.to(self.device), self.cfg.model.computes_loss)
            losses.append(float(loss))
        return sum(losses) / len(losses)

    def state_dict(self, shards_tag: str | None = None) -> dict[str, Any]:
        """The trainer's state. Sharded (fsdp), its position only, naming the tag of the
        rank files that hold the model and inner AdamW shards (``shard_state`` on every
        rank; node/shard_files.py): no rank gathers the whole model."""
        state: dict[str, Any] = {
            "sampler": self.batches.state_dict(), "step": self.step, "tokens": self.tokens,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }
        if self.sharded:
            if shards_tag is None:
                raise ValueError("a sharded trainer's state names its rank files: pass shards_tag")
            state["shards"] = {"tag": shards_tag, "ranks": self.processes}
        else:
            state["model"], state["opt"] = self.model.state_dict(), self.opt.state_dict()
        return state

    def shard_state(self, tag: str) -> dict[str, Any]:
        """This rank's shards of the model and the inner AdamW state (live tensors)."""
        from .shard_files import local_state

        return local_state(self.model, self.opt, tag, self.rank, self.processes)

    def load_shard_state(self, state: dict[str, Any]) -> None:
        """After ``distribute``: this rank's shards from its rank file."""
        from .shard_files import load_local_state

        load_local_state(self.model, self.opt, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before ``distribute``. A sharded checkpoint's model and AdamW state come later,
        from the rank files (``load_shard_state``); a gathered one (a sharded node's
        checkpoint of an earlier version) loads on any number of ranks."""
        if "shards" in state:
            ranks = int(state["shards"]["ranks"])
            if not (self.cfg.node.parallel == "fsdp" and self.cfg.node.nproc_per_node == ranks):
                raise ValueError(f"the checkpoint holds the shards of a node of {ranks} ranks (node.parallel "
                                 f"fsdp): start this one with --nproc-per-node {ranks} --set node.parallel='fsdp'")
        else:
            self.model.load_state_dict(state["model"])
            if any(isinstance(k, str) for k in state["opt"].get("state", {})):
                from .sharding import load_full_optimizer_state

                load_full_optimizer_state(self.model, self.opt, state["opt"])
            else:
                self.opt.load_state_dict(state["opt"])
        self.batches.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: true, false, or "auto" (on a GPU; not on the CPU, where compiling
    costs a large share of a short run and the small models trained there gain little:
    docs/BENCHMARKS.md has both measured)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)
