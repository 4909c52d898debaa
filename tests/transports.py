"""Transports for tests that send kinds of their own (a transport drops kinds it does not know)."""

from __future__ import annotations

from typing_extensions import TypedDict

from loco.protocols.messages import SCHEMAS
from loco.protocols.transport import Transport


class Anything(TypedDict, total=False):
    x: int


TEST_KINDS = ("PING", "AFTER", "STILL", "HELLO", "ONCE", "BOOM", "X", "BIG", "LAST")
TEST_SCHEMAS = {**SCHEMAS, **{k: Anything for k in TEST_KINDS}}


def open_transport(name: str, **kw) -> Transport:
    return Transport(name, schemas=TEST_SCHEMAS, **kw)
