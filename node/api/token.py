"""Join tokens: what a process needs to join a swarm — the swarm's secret key and where to
reach a live member — as one string to pass on (``loco.Swarm(join=TOKEN)``,
``loco node start --join TOKEN``). Treat a token like a password: whoever holds it can join
the swarm, read the model and contribute to it."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence

PREFIX = "loco1."


def new_key() -> str:
    """A random swarm key (192 bits)."""
    return secrets.token_urlsafe(24)


def make_token(key: str, maddrs: Sequence[str]) -> str:
    body = json.dumps({"key": key, "peers": list(maddrs)}, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def parse_token(token: str) -> tuple[str, list[str]]:
    """(key, peer multiaddresses); ValueError naming what is wrong with ``token``."""
    token = token.strip()
    if not token.startswith(PREFIX):
        raise ValueError(f"not a loco join token (it starts with {PREFIX!r}; a bare multiaddress joins only "
                         f"an insecure swarm): {token[:40]!r}")
    raw = token[len(PREFIX):]
    try:
        body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        key, peers = body["key"], body["peers"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("the join token is damaged (copied in part?)") from None
    if not (isinstance(key, str) and key and isinstance(peers, list) and peers
            and all(isinstance(p, str) for p in peers)):
        raise ValueError("the join token holds no key or no peer address")
    return key, peers
