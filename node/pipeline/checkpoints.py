"""A pipeline node's checkpoints: periodic (``train.checkpoint_every`` /
``checkpoint_interval_s``) and final, copied on the training thread and written atomically
in the background (the daemon's CheckpointWriter); and the restart of a sole replica, which
resumes its stage from its own latest checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, load_latest
from ..checkpoint_writer import Cadence, CheckpointWriter, private_copy
from ..config import TrainConfig
from .stage_state import StageState

log = logging.getLogger("loco.node.pipeline")


class StageCheckpoints:
    def __init__(self, path: Path, train: TrainConfig, record: Callable[..., Any]):
        """``record(kind, **fields)``: where a failed checkpoint is recorded (the metrics file)."""
        self.path, self.train, self.record = path, train, record
        self._cadence = Cadence(train.checkpoint_every, train.checkpoint_interval_s)
        self._writer: CheckpointWriter | None = None  # made at the first checkpoint
        self._unreadable = False  # the file could not be read at the start: never written over
        self._saved_it = -1  # the iteration count of the last checkpoint handed to the writer

    def resume(self, state: StageState) -> str:
        """Load this node's latest checkpoint of its stage into ``state`` (a joining node
        whose stage has no live replica); returns what the stage starts from: the checkpoint
        or, if there is none that fits, the seed."""
        try:
            saved, _ = load_latest(self.path)
        except (OSError, CheckpointError) as exc:
            log.warning("%s; stage %d starts from the seed, and this node will not write over that file", exc,
                        state.stage)
            self._unreadable = True
            return "seed"
        if saved is None:
            log.warning("no replica of stage %d alive and no checkpoint of it: it starts from the seed", state.stage)
            return "seed"
        problem = state.restore(saved)
        if problem is not None:
            log.warning("checkpoint %s does not fit (%s); stage %d starts from the seed", self.path, problem,
                        state.stage)
            return "seed"
        return f"checkpoint {self.path.name}"

    def save(self, state: StageState, it: int) -> None:
        """Hand a copy of the checkpoint to the background writer (it keeps the previous
        ``train.keep_checkpoints`` beside it; writes are atomic); a failure is logged and
        recorded, never raised: training goes on."""
        if self._unreadable:
            self._failed(it, OSError(f"{self.path} could not be read at the start and is kept as it was"))
            return
        if self._writer is None:
            self._writer = CheckpointWriter(self.path, self.train.keep_checkpoints, self._failed)
        self._writer.submit(private_copy(state.checkpoint(it)), it)
        self._saved_it = it

    def periodic(self, state: StageState, it: int) -> float:
        """A checkpoint if one is due after ``it`` iterations; returns the seconds it took."""
        if not self._cadence.due(it):
            return 0.0
        t0 = time.monotonic()
        self.save(state, it)
        return time.monotonic() - t0

    def close(self, state: StageState, it: int) -> None:
        """The final checkpoint (unless the last periodic one holds it), written before this returns."""
        if self._saved_it != it:
            self.save(state, it)
        if self._writer is not None:
            self._writer.close()

    def _failed(self, it: int, exc: BaseException) -> None:
        # full disk, NaN: the previous checkpoint is kept, training goes on
        log.error("checkpoint to %s failed (%s); the previous one is kept", self.path, exc)
        self.record("checkpoint_failed", round=it, error=str(exc))
