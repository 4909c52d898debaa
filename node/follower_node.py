"""The ranks of a node of several processes (node.nproc_per_node > 1) other than rank 0.

Rank 0 is the daemon's ``Node``: it holds the swarm, the outer algorithm, the metrics and the
checkpoints. Every other rank is a ``FollowerNode``: the same model and inner optimizer on
its own device and its own batches, trained together with rank 0 through
DistributedDataParallel, and the library's ``loco.Follower`` for the outer algorithm (it
receives every round's outcome and the weights from rank 0). Rank 0 decides before every
inner step whether there is one (``next_step``): its budget, its stop signal; the others do
what it says, so every rank runs the same steps and none waits in a collective the others
never reach.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from loco import Ranks
from loco.node.optstate import adam_step, adam_tensors, load_adam

from .build import averages_gradients, build_algorithm
from .checkpoint import checkpoint_file, load_checkpoint
from .checkpoint_writer import CheckpointWriter, private_copy
from .config import Config
from .shard_files import rank_file, versions_kept
from .trainer import Trainer

log = logging.getLogger(__name__)


def share_trainer_state(ranks: Ranks, trainer: Trainer) -> None:
    """Rank 0's weights, inner AdamW state and position (step, tokens, batches drawn) on
    every rank: a resumed rank 0 read them from its checkpoint; the others start from it.
    Each rank's sampling stream is its own, advanced by as many batches as rank 0 drew
    (the ranks draw one batch each per step)."""
    opt, params = trainer.opt, trainer.params
    where = ranks.share({"step": trainer.step, "tokens": trainer.tokens,
                         "batches": trainer.sampler.batches_drawn, "adam_step": adam_step(opt, params)}
                        if ranks.leads else None)
    ranks.share_tensors(params)
    moments = adam_tensors(opt, params) if where["adam_step"] else []
    if moments:
        ranks.share_tensors(moments)
    if ranks.leads:
        return
    if moments:
        load_adam(opt, params, moments, where["adam_step"])
    trainer.step, trainer.tokens = where["step"], where["tokens"]
    trainer.sampler.advance(where["batches"])


def load_shards(ranks: Ranks, trainer: Trainer, files: list[Path] | None = None) -> dict[str, Any] | None:
    """After ``distribute``: every rank loads its shards from the rank file rank 0 chose
    (``files``, in rank order: a complete set, node/shard_files.py), if it resumed from a
    sharded checkpoint. Returns what the file holds (None: no sharded checkpoint)."""
    paths = ranks.share([str(f) for f in files] if ranks.leads and files else None)
    if paths is None:
        return None
    state = load_checkpoint(Path(paths[ranks.rank]))
    if state is None:
        raise FileNotFoundError(f"rank {ranks.rank}'s checkpoint {paths[ranks.rank]} disappeared")
    trainer.load_shard_state(state)
    return state


def shard_writer(cfg: Config, out: Path, node_id: str, rank: int, on_error) -> CheckpointWriter:
    """The background writer of this rank's shards (one previous version kept at least:
    a node stopped between its ranks' writes resumes from the previous complete set)."""
    main = checkpoint_file(out / "checkpoints", node_id)
    return CheckpointWriter(rank_file(main, rank), versions_kept(cfg.train.keep_checkpoints), on_error)


def next_step(ranks: Ranks | None, go: bool = False) -> bool:
    """Rank 0's decision whether the node takes another inner step, on every rank (rank 0
    passes it)."""
    return go if ranks is None else bool(ranks.share(go))


# What rank 0 asks the other ranks to do with it between two steps or after the last one,
# where the model is sharded over them (fsdp: a forward is a collective; each rank writes
# its own shards, ``(CHECKPOINT, tag)``).
EVALUATE, CHECKPOINT, DONE = "evaluate", "checkpoint", "done"


class FollowerNode:
    """A rank > 0 of a node: trains the steps rank 0 decides, follows its outer algorithm."""

    def __init__(self, cfg: Config, node_id: str, ranks: Ranks, stop: threading.Event, out: Path):
        self.cfg = cfg
        self.id = node_id
        self.ranks = ranks
        self.stop = stop  # a signal here changes nothing: rank 0 decides when the node stops
        self.out = out
        self._writer: CheckpointWriter | None = None
        self.outer: Any = None  # its stand-in for rank 0's outer algorithm, once built

    def run(self) -> int:
        cfg, ranks = self.cfg, self.ranks
        if cfg.node.threads:
            torch.set_num_threads(cfg.node.threads)
        trainer = Trainer(cfg, self.id, rank=ranks.rank, exact_clip=averages_gradients(cfg))
        share_trainer_state(ranks, trainer)
        trainer.distribute(ranks.group)
        saved = load_shards(ranks, trainer)
        outer = self.outer = build_algorithm(cfg, trainer.model, trainer.opt, None, join=False, ranks=ranks)
        try:
            if saved is not None and "outer" in saved:  # this rank's region of a split outer state
                outer.load_state_dict(saved["outer"])
            outer.join()
            while self._next(trainer) is True:
                trainer.train_step(outer.sync_gradients, read_loss=False)
                outer.step()
            last = self._next(trainer)  # after rank 0's final checkpoint
            if last != DONE:
                raise RuntimeError(f"rank 0 said {last!r} after the last step, not {DONE!r}")
        finally:
            outer.close()
            if self._writer is not None:
                self._writer.close()  # this rank's last shards written before the node ends
        log.info("rank %d of node %s: done at step %d, round %d", ranks.rank, self.id, trainer.step, outer.round)
        return 0

    def _next(self, trainer: Trainer) -> object:
        """Rank 0's next word: whether there is another step (or DONE after the last),
        doing first what it asks in between (its evaluation, its checkpoint)."""
        while True:
            message = self.ranks.share()
            if message == EVALUATE:
                trainer.evaluate()
            elif isinstance(message, tuple) and message[0] == CHECKPOINT:
                self._checkpoint(trainer, message[1])
            else:
                return message

    def _checkpoint(self, trainer: Trainer, tag: str) -> None:
        if self._writer is None:
            self._writer = shard_writer(self.cfg, self.out, self.id, self.ranks.rank, self._failed)
        # (a split outer state: this rank's region of it, which only this rank holds)
        self._writer.submit({**private_copy(trainer.shard_state(tag)), "outer": self.outer.state_dict()}, tag)

    def _failed(self, tag: str, exc: BaseException) -> None:
        log.error("rank %d of node %s: writing its shards (%s) failed (%s); the previous ones are kept",
                  self.ranks.rank, self.id, tag, exc)
