"""The algorithms' settings as the protocols take them."""

from __future__ import annotations

from loco.node.config import CollectiveConfig, CompressionConfig
from loco.protocols.codecs import Compressor
from loco.protocols.collective import CollectiveTimeouts


def as_compression(compression: str | CompressionConfig) -> CompressionConfig:
    return CompressionConfig(codec=compression) if isinstance(compression, str) else compression


def collective_timeouts(t: CollectiveConfig) -> CollectiveTimeouts:
    return CollectiveTimeouts(t.matchmaking_timeout_s, t.join_timeout_s, t.allreduce_timeout_s,
                              t.decision_timeout_s, t.max_attempts)


def compressor_for(compression: str | CompressionConfig, seed: int) -> Compressor:
    z = as_compression(compression)
    return Compressor(z.codec, z.error_feedback, block=z.block_size, density=z.density, rank=z.rank, seed=seed)
