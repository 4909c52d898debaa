"""Optional copies of a node's records for the tools researchers already watch: TensorBoard
event files and Weights & Biases runs (offline mode needs no network). Each is fed the same
records as the JSONL file (``MetricsWriter.add_sink``), so the three never disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import ConfigError

# record fields charted, by event (a round's time split, its bytes and rates; train losses)
ROUND_FIELDS = ("loss", "val_loss", "group_size", "compute_s", "comm_s", "publish_s", "weights_hash_s", "eval_s",
                "checkpoint_s", "wall_s", "utilization", "round_bytes", "bytes_sent", "bytes_recv", "tokens",
                "gpu_mem_gb")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one record worth a chart, named ``train/...`` and ``round/...``."""
    event = record.get("event")
    if event == "train":
        return {"train/loss": float(record["loss"])}
    if event == "outer":
        out = {f"round/{k}": float(record[k]) for k in ROUND_FIELDS
               if isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)}
        out["round/ok"] = 1.0 if record.get("status") == "ok" else 0.0
        return out
    return {}


class TensorBoardSink:
    """Scalars in ``folder`` (one TensorBoard run per node), against the inner step."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logging.tensorboard needs the tensorboard package: pip install 'loco[tensorboard]'") \
                from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def observe(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if step is None:
            return
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=int(step), walltime=record.get("time"))
        if record.get("event") == "outer":
            self.writer.flush()  # a round's charts show while the next runs

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run per node (``mode`` offline: files under ``folder`` only, to
    `wandb sync` later; online: streamed to the server the environment configures)."""

    def __init__(self, folder: Path, mode: str, project: str, node_id: str, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.wandb needs the wandb package: pip install 'loco[wandb]'") from None
        folder.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, name=node_id, group=config["swarm"]["run_id"], dir=str(folder),
                              mode=mode, config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def observe(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values and record.get("step") is not None:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # its service process ends with the run: a stopped node leaves nothing behind
