"""Per-node identities: an Ed25519 keypair per node, and the table that binds node ids to keys.

The swarm key keeps outsiders out; it cannot tell one member from another. So each node also
signs what it sends (messages, and its membership record) with its own private key, and
names its public key beside its node id. A receiver binds a node id to the first public key
it sees for it (trust on first use, as SSH does) and refuses every other key for that id
while the bound one is alive: a member cannot speak as another live member. A binding is
released when its node leaves (a signed ``left`` record) or has gone unheard for
``stale_s``, so a process that restarts without its old key can take its id back once its
predecessor is gone. A daemon keeps its key under ``--out`` and comes back with the same one.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class NodeKey:
    """A node's Ed25519 private key."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> NodeKey:
        """The key kept in ``path`` (32 raw bytes, owner-readable only), made there on first use.
        ValueError naming the file if it holds anything else."""
        path = Path(path)
        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ValueError(f"{path} is not a loco node key (32 bytes expected, found {len(raw)}); "
                                 f"remove it to make a new identity")
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes())
        os.replace(tmp, path)  # two processes racing on one folder both end with one valid key file
        return cls.load_or_create(path) if path.read_bytes() != key.private_bytes() else key

    def private_bytes(self) -> bytes:
        """The raw private key (for the other processes of the same member only)."""
        return self._private.private_bytes_raw()

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeKey:
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


@functools.lru_cache(maxsize=4096)
def _public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(public: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``public``'s signature of ``data`` (False for malformed input)."""
    if len(public) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        _public_key(bytes(public)).verify(bytes(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


class IdentityPins:
    """Node id -> the public key this process has bound it to. Thread-safe; bounded."""

    def __init__(self, stale_s: float = 60.0, max_ids: int = 65_536, clock: Callable[[], float] = time.monotonic):
        self.stale_s = stale_s
        self.clock = clock
        self.max_ids = max_ids
        self._pins: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    def check(self, node_id: str, public: bytes) -> str | None:
        """None if ``public`` may speak for ``node_id`` (binding it if the id is free or its
        key has gone stale), else the reason it may not."""
        now = self.clock()
        with self._lock:
            pinned = self._pins.get(node_id)
            if pinned is not None and pinned[0] != public and now - pinned[1] <= self.stale_s:
                return (f"{node_id[:64]!r} is bound to key {pinned[0].hex()[:16]}…, "
                        f"this one is {bytes(public).hex()[:16]}…")
            self._pins.pop(node_id, None)  # re-inserted last: the dict is oldest first
            self._pins[node_id] = (bytes(public), now)
            if len(self._pins) > self.max_ids:
                del self._pins[next(iter(self._pins))]
        return None

    def release(self, node_id: str, public: bytes) -> None:
        """``node_id`` left (a record signed by its bound key says so): its id is free again."""
        with self._lock:
            pinned = self._pins.get(node_id)
            if pinned is not None and pinned[0] == public:
                del self._pins[node_id]

    def bound(self, node_id: str) -> bytes | None:
        with self._lock:
            pinned = self._pins.get(node_id)
            return None if pinned is None else pinned[0]
