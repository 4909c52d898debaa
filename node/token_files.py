"""Token files: ``.bin`` (raw little-endian uint16 or uint32 ids) with an optional JSON
sidecar, and ``.npy`` arrays. Both are memory-mapped, never read whole: a multi-GB corpus
costs address space, not memory.

The sidecar of ``tokens.bin`` is ``tokens.json``: ``{"dtype": "uint16" | "uint32",
"vocab_size": N, "tokenizer": "tokenizer.json"}`` (every key optional; ``loco tokenize``
writes all three). Without one, a ``.bin`` holds uint16 ids (nanoGPT's convention) unless
``data.token_dtype`` says otherwise.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError

DTYPES = ("uint16", "uint32")
_CHUNK = 1 << 22  # ids per read when scanning a file (16 MiB of uint32)


@dataclass(frozen=True)
class TokenFile:
    tokens: np.ndarray  # 1-D, memory-mapped
    vocab_size: int | None  # from the sidecar; None: unknown (scan the ids)
    tokenizer: Path | None  # the tokenizer that made the ids, where the sidecar names one


def sidecar_of(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_sidecar(path: Path) -> dict:
    side = sidecar_of(path)
    if not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"data.path: sidecar {side} is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"data.path: sidecar {side} holds {type(meta).__name__}, expected an object")
    if meta.get("dtype", "uint16") not in DTYPES:
        raise ConfigError(f"data.path: sidecar {side} has dtype {meta['dtype']!r}; expected one of {', '.join(DTYPES)}")
    vocab = meta.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1):
        raise ConfigError(f"data.path: sidecar {side} has vocab_size {vocab!r}; expected a positive integer")
    return meta


def open_tokens(path: Path, dtype: str | None = None) -> TokenFile:
    """The ids of a ``.bin`` or ``.npy`` file, memory-mapped. ``dtype``: what the user
    stated (``data.token_dtype``); it must agree with the sidecar where there is one.
    ConfigError (one line naming the file) for anything that is not a 1-D integer array."""
    meta = _read_sidecar(path) if path.suffix == ".bin" else {}
    if dtype and "dtype" in meta and meta["dtype"] != dtype:
        raise ConfigError(f"data.token_dtype is {dtype!r} but {sidecar_of(path)} records {meta['dtype']!r}")
    chosen = dtype or meta.get("dtype", "uint16")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            size = path.stat().st_size
            if size % np.dtype(chosen).itemsize:
                raise ValueError(f"{size} bytes is not a whole number of {chosen} ids")
            arr = np.memmap(path, dtype=chosen, mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"data.path: {path} is not a token array ({str(exc).splitlines()[0][:120]}); "
                          f".npy: a 1-D integer array, .bin: uint16 or uint32 ids (data.token_dtype or a "
                          f"sidecar {sidecar_of(path).name} says which)") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"data.path: {path} holds a {arr.ndim}-D {arr.dtype} array, not 1-D integer token ids")
    tokenizer = meta.get("tokenizer")
    return TokenFile(arr, meta.get("vocab_size"), path.parent / tokenizer if isinstance(tokenizer, str) else None)


def token_range(tokens: np.ndarray) -> tuple[int, int]:
    """(min, max) id, read a chunk at a time: a memory-mapped file is scanned with bounded
    memory."""
    lo, hi = None, None
    for start in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[start:start + _CHUNK])
        lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
        hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
    if lo is None:
        raise ConfigError("data: the token file is empty")
    return lo, hi


def write_tokens(path: Path, ids: np.ndarray, vocab_size: int, tokenizer: str | None = None) -> None:
    """``ids`` as a ``.bin`` (the smallest dtype that holds ``vocab_size``) and its sidecar,
    each written atomically (a temp file renamed into place)."""
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    meta = {"dtype": dtype, "vocab_size": int(vocab_size), **({"tokenizer": tokenizer} if tokenizer else {})}
    _atomic_write(path, np.ascontiguousarray(ids, dtype=dtype).tobytes())
    _atomic_write(sidecar_of(path), (json.dumps(meta, indent=1) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
