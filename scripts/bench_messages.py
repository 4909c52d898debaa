"""The message kinds the transport benchmarks send (DATA, ACK), beside loco's own: a loco
transport drops kinds it has no schema for."""

from __future__ import annotations

from typing_extensions import TypedDict

from loco.protocols.messages import SCHEMAS


class BenchMeta(TypedDict, total=False):
    endpoint: str


BENCH_SCHEMAS = {**SCHEMAS, "DATA": BenchMeta, "ACK": BenchMeta}
