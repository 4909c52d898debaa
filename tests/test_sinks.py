"""TensorBoard and W&B copies of a node's records, read back with each tool's own reader."""

from __future__ import annotations

import pytest

from loco.node.config import load_config
from loco.node.metrics import MetricsWriter
from loco.node.runtime import open_record_sinks

RECORDS = [
    ("start", {"step": 0, "round": 0, "val_loss": 5.0}),
    ("train", {"step": 4, "round": 0, "loss": 4.0}),
    ("train", {"step": 8, "round": 0, "loss": 3.5}),
    ("outer", {"step": 8, "round": 0, "loss": 3.5, "val_loss": 3.6, "status": "ok", "group_size": 2,
               "compute_s": 1.0, "comm_s": 0.25, "wall_s": 1.5, "tokens": 512}),
    ("outer", {"step": 16, "round": 1, "loss": 3.0, "val_loss": 3.1, "status": "skipped", "group_size": 1,
               "compute_s": 1.0, "comm_s": 0.5, "wall_s": 1.7, "tokens": 1024}),
    ("stop", {"step": 16, "round": 2}),
]


def _write(tmp_path, *overrides: str) -> None:
    cfg = load_config(overrides=list(overrides))
    writer = MetricsWriter(tmp_path / "metrics" / "n0.jsonl", "n0")
    closers = open_record_sinks(cfg, "n0", tmp_path, writer)
    assert len(closers) == 1
    for event, fields in RECORDS:
        writer.write(event, **fields)
    for close in closers:
        close()
    writer.close()


def test_tensorboard_scalars_are_the_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path, "logging.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "tensorboard" / "n0"))
    events.Reload()
    read = lambda tag: [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]  # noqa: E731
    assert read("train/loss") == [(4, 4.0), (8, 3.5)]
    assert read("round/val_loss") == [(8, 3.6), (16, 3.1)]
    assert read("round/comm_s") == [(8, 0.25), (16, 0.5)]
    assert read("round/ok") == [(8, 1.0), (16, 0.0)]


def test_wandb_offline_run_holds_the_records(tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_SILENT", "true")
    _write(tmp_path, "logging.wandb='offline'", "logging.wandb_project='t'")
    runs = list((tmp_path / "wandb").rglob("*.wandb"))
    assert len(runs) == 1, runs
    logged: dict[int, dict[str, float]] = {}
    for data in _wandb_file_records(runs[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            step = int(row.pop("_step"))
            logged.setdefault(step, {}).update({k: float(v) for k, v in row.items() if not k.startswith("_")})
    assert logged[4]["train/loss"] == 4.0
    assert logged[8]["train/loss"] == 3.5 and logged[8]["round/val_loss"] == pytest.approx(3.6)
    assert logged[16]["round/ok"] == 0.0 and logged[16]["round/tokens"] == 1024


def _wandb_file_records(data: bytes) -> list[bytes]:
    """The records of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB's
    log format (32 KiB blocks of records, each with a 7-byte header: crc32, length, type
    1 full / 2 first / 3 middle / 4 last piece)."""
    assert data[:4] == b":W&B"
    block, pos, out, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            out.append(pending + chunk)
    return out


def test_wandb_leaves_no_process_behind(tmp_path, monkeypatch):
    import os
    import subprocess

    monkeypatch.setenv("WANDB_SILENT", "true")
    _write(tmp_path, "logging.wandb='offline'")
    children = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "cmd="], capture_output=True, text=True)
    assert "wandb" not in children.stdout
