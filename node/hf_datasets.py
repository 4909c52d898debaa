"""A local HuggingFace ``datasets`` folder (``Dataset.save_to_disk`` output) as a corpus.

Needs the ``datasets`` extra (``pip install 'loco[datasets]'``); nothing is downloaded. A
folder with splits uses its ``train`` split and its ``validation`` (else ``test``) split;
one without takes the last ``data.val_fraction`` of its rows for validation. Rows become one
stream of ids: a column of token ids (``input_ids``) as they are, else the text column
(``data.text_column``) as UTF-8 bytes with a NUL byte between rows, like text files. It is
read into memory up to ``data.max_bytes`` per split (ids count 4 bytes each).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import ConfigError, DataConfig


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _values(rows, column: str):
    """The column's values, a batch of rows at a time (never the whole column at once)."""
    for batch in rows.iter(batch_size=1024):
        yield from batch[column]


def _stream(rows, column: str, max_bytes: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    ids = column == "input_ids"
    budget = max_bytes // 4 if ids else max_bytes
    for value in _values(rows, column):
        if budget <= 0:
            break
        if ids:
            chunk = np.asarray(value[:budget], dtype=np.int64)
        else:
            chunk = np.frombuffer((value or "").encode("utf-8")[: budget - 1] + b"\0", dtype=np.uint8)
        parts.append(chunk)
        budget -= len(chunk)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64 if ids else np.uint8)


def load_datasets_folder(path: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ConfigError(f"data.path: {path} is a HuggingFace datasets folder; reading it needs the datasets "
                          f"package: pip install 'loco[datasets]'") from None
    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a broken folder
        raise ConfigError(f"data.path: {path} is not a readable datasets folder ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"data.path: {path} has splits {sorted(ds)}, none named 'train'")
        held_out = next((ds[s] for s in ("validation", "test") if s in ds), None)
        train_rows = ds["train"]
        if held_out is None:
            cut = int(len(train_rows) * (1 - cfg.val_fraction))
            train_rows, held_out = train_rows.select(range(cut)), train_rows.select(range(cut, len(train_rows)))
    else:
        cut = int(len(ds) * (1 - cfg.val_fraction))
        train_rows, held_out = ds.select(range(cut)), ds.select(range(cut, len(ds)))
    columns = train_rows.column_names
    column = "input_ids" if "input_ids" in columns else cfg.text_column
    if column not in columns:
        raise ConfigError(f"data.text_column: {path} has no column {column!r} (columns: {', '.join(columns)})")
    train_budget = int(cfg.max_bytes * (1 - cfg.val_fraction))
    return _stream(train_rows, column, train_budget), _stream(held_out, column, cfg.max_bytes - train_budget)
