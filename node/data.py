"""Training data: the default corpus (the Python standard library's own source), user text
or token files (memory-mapped: node/token_files.py), a deterministic train/validation
split, and per-node sampling streams."""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .hf_datasets import is_datasets_folder, load_datasets_folder
from .token_files import open_tokens, sidecar_of, token_range


def _is_val(rel_path: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(rel_path.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _read_files(root: Path, files: list[Path], cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Split by file path hash (stable across machines), then read in sorted order up to
    max_bytes. Files are separated by a NUL byte."""
    train: list[bytes] = []
    val: list[bytes] = []
    budget = {"train": int(cfg.max_bytes * (1 - cfg.val_fraction)), "val": int(cfg.max_bytes * cfg.val_fraction)}
    for f in sorted(files):
        rel = f.relative_to(root).as_posix() if f != root else f.name
        split = "val" if _is_val(rel, cfg.val_fraction) else "train"
        if budget[split] <= 0:
            continue
        try:
            data = f.read_bytes()[: budget[split]]
        except OSError:
            continue
        (val if split == "val" else train).append(data + b"\0")
        budget[split] -= len(data) + 1
    return np.frombuffer(b"".join(train), dtype=np.uint8), np.frombuffer(b"".join(val), dtype=np.uint8)


def _stdlib_sources(root: Path) -> list[Path]:
    """The .py files under ``root`` outside any site-packages folder. Those folders are not
    entered at all: a venv's or pyenv's can hold ten times the standard library's files,
    and walking them cost every node process a quarter of a second."""
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d != "site-packages"]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return files


def _split_array(arr: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(arr) * (1 - val_fraction))
    return arr[:cut], arr[cut:]


def _keys_apply(cfg: DataConfig, path: Path | None) -> None:
    """A data key set for a kind of data.path it does not act on is an error, not ignored."""
    where = f"data.path {path}" if path else "the default corpus"
    token_file = path is not None and path.suffix in (".npy", ".bin")
    if cfg.token_dtype and not (path is not None and path.suffix == ".bin"):
        raise ConfigError(f"data.token_dtype applies to a .bin token file, not to {where}")
    if cfg.text_column != "text" and not (path is not None and is_datasets_folder(path)):
        raise ConfigError(f"data.text_column applies to a HuggingFace datasets folder, not to {where}")
    if token_file and cfg.max_bytes != DataConfig.model_fields["max_bytes"].default:
        raise ConfigError(f"data.max_bytes limits text corpora and datasets folders; {where} is memory-mapped whole")


def load_corpus(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) arrays of token ids (bytes, or the user's token array)."""
    _keys_apply(cfg, Path(cfg.path) if cfg.path else None)
    if cfg.path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _stdlib_sources(root)
        train, val = _read_files(root, files, cfg)
    else:
        path = Path(cfg.path)
        if not path.exists():
            raise ConfigError(f"data.path: {path} does not exist")
        if path.suffix in (".npy", ".bin"):
            train, val = _split_array(open_tokens(path, cfg.token_dtype).tokens, cfg.val_fraction)
        elif is_datasets_folder(path):
            train, val = load_datasets_folder(path, cfg)
        elif path.is_dir():
            train, val = _read_files(path, [p for p in path.rglob("*") if p.is_file()], cfg)
        else:
            train, val = _split_array(np.frombuffer(path.read_bytes()[: cfg.max_bytes], dtype=np.uint8),
                                      cfg.val_fraction)
    return train, val


def check_corpus(train: np.ndarray, val: np.ndarray, block_size: int, vocab: int, cfg: DataConfig) -> None:
    """Both splits hold a window, and every id is inside the model's vocabulary: a token
    file's sidecar ``vocab_size`` answers for its ids; without one they are scanned a chunk
    at a time (bounded memory on a memory-mapped file)."""
    for name, arr in (("train", train), ("validation", val)):
        if len(arr) < block_size + 2:
            raise ConfigError(f"data: the {name} split has {len(arr)} tokens, fewer than block_size+2")
    path = Path(cfg.path) if cfg.path else None
    recorded = open_tokens(path, cfg.token_dtype).vocab_size if path and path.suffix == ".bin" else None
    if recorded is not None:
        if recorded > vocab:
            raise ConfigError(f"data: {sidecar_of(path)} records a vocabulary of {recorded}, larger than the "
                              f"model's vocabulary of {vocab} (model.vocab_size for the built-in GPT)")
        return
    (train_lo, train_hi), (val_lo, val_hi) = token_range(train), token_range(val)  # one pass over each
    lo, hi = min(train_lo, val_lo), max(train_hi, val_hi)
    if lo < 0:
        raise ConfigError(f"data: token id {lo} is negative")
    if hi >= vocab:
        raise ConfigError(f"data: token id {hi} is outside the model's vocabulary of {vocab}")


class Sampler:
    """A node's own random stream of training windows; its position is checkpointed."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_windows(self) -> torch.Tensor:
        """int64 [batch_size, block_size + 1]: the next batch's windows of tokens."""
        starts = torch.randint(0, len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.gen)
        rows = np.stack([self.data[s : s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        self.batches_drawn += 1
        return torch.from_numpy(rows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, block_size]; y is x shifted by one token."""
        t = self.next_windows()
        return t[:, :-1], t[:, 1:]

    def advance(self, batches: int) -> None:
        """Skip ``batches`` batches unread: the stream is then where drawing them leaves it
        (the ranks of a node draw in step, so a restarted rank finds its place from rank 0's
        count)."""
        for _ in range(batches):
            torch.randint(0, len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.gen)
        self.batches_drawn += batches

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.batches_drawn = int(state["batches_drawn"])


class BatchFeed:
    """The sampler's batches as the inner steps use them, on the training device. On a GPU
    the next batch is drawn and its copy queued while the device runs the current step
    (``prefetch``), from reused pinned host buffers, so no step waits for the host: two
    buffers, each reused only after its copy is done. On the CPU batches are drawn when
    asked. The position checkpointed is the sampler's before any prefetched batch: a
    resumed run draws that batch again."""

    def __init__(self, sampler: Sampler, device: torch.device):
        self.sampler = sampler
        self.device = device
        self._cuda = device.type == "cuda"
        self._ready: torch.Tensor | None = None  # the prefetched batch's windows, on the device
        self._before: dict[str, Any] | None = None  # the sampler's state before drawing it
        self._pinned: list[torch.Tensor] = []
        self._copied: list[Any] = []  # per pinned buffer: the CUDA event of its last copy
        self._slot = 0

    def _to_device(self, rows: torch.Tensor) -> torch.Tensor:
        if not self._pinned:
            self._pinned = [torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True) for _ in range(2)]
            self._copied = [None, None]
        slot = self._slot
        self._slot ^= 1
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()  # its previous copy, queued two steps ago, is done
        self._pinned[slot].copy_(rows)
        out = self._pinned[slot].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._copied[slot] = event
        return out

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of the next step, on the device."""
        rows = self._ready
        self._ready, self._before = None, None
        if rows is None:
            rows = self.sampler.next_windows()
            rows = self._to_device(rows) if self._cuda else rows.to(self.device)
        return rows[:, :-1], rows[:, 1:]

    def prefetch(self) -> None:
        """Draw the next batch now and queue its copy (GPU only)."""
        if self._cuda and self._ready is None:
            self._before = self.sampler.state_dict()
            self._ready = self._to_device(self.sampler.next_windows())

    def state_dict(self) -> dict[str, Any]:
        return self._before if self._before is not None else self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._ready, self._before = None, None


def validation_batches(val: np.ndarray, block_size: int, batch_size: int, count: int, seed: int):
    """The same fixed windows on every node, so validation losses are comparable."""
    sampler = Sampler(val, block_size, batch_size, seed=10_000_019 + seed)
    return [sampler.next_batch() for _ in range(count)]


def node_seed(seed: int, node_id: str, rank: int = 0) -> int:
    """The seed of a node's sampling stream (of its rank ``rank``: rank 0's is the node's own)."""
    name = node_id if rank == 0 else f"{node_id}/rank{rank}"
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1
