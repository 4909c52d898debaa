"""L-GreCo inside a round: when to plan per-layer compression levels, and from what."""

from __future__ import annotations

from typing import Any

from loco.node.config import CompressionConfig
from loco.protocols.codecs import Compressor, codec_family
from loco.protocols.codecs.lgreco import make_plan, plan_digest


def plan_if_due(z: CompressionConfig, compressor: Compressor, round: int, result: Any) -> dict[str, Any] | None:
    """Every ``lgreco.every_rounds`` rounds after the warm-up, plan per-layer levels from the
    averaged update just applied (``result``: the math's OuterStepResult, before the round
    advances) and set them on ``compressor``. Every member applied the same update, so all
    plan alike. Returns the plan's record (None: not due)."""
    lg = z.lgreco
    if not (lg.enabled and result.applied and result.reduce is not None and result.reduce.tensors
            and round >= lg.warmup_rounds and (round - lg.warmup_rounds) % lg.every_rounds == 0):
        return None
    # on the host: the codecs run there, and every member must compute the same plan
    averaged = [t.detach().cpu() for t in result.reduce.tensors]
    plan = make_plan(codec_family(z.codec), compressor.base.level, averaged,
                     {"block": z.block_size, "density": z.density, "rank": z.rank}, lg.bins)
    compressor.plan = plan.levels
    return {"plan": plan_digest(plan.levels), "levels": [plan.levels[i] for i in sorted(plan.levels)],
            "error": plan.error, "uniform_error": plan.uniform_error, "bytes": plan.bytes,
            "uniform_bytes": plan.uniform_bytes}
