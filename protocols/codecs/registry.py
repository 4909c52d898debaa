"""Codec names, families and the levels L-GreCo may choose from."""

from __future__ import annotations

from typing import Any

import torch

from .base import Codec
from .half import HalfCodec
from .identity import IdentityCodec
from .powersgd import PowerSGDCodec
from .quantize import BlockQuantCodec
from .topk import TopKCodec

CODECS = ("none", "fp16", "bf16", "int8", "int4", "int2", "topk", "powersgd")


def codec_family(name: str) -> str:
    """int8/int4/int2 are one family (the level is the bit width); the others are their own."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(CODECS)}")
    return "int" if name.startswith("int") else name


def valid_level(family: str, level: Any) -> bool:
    if family == "int":
        return isinstance(level, int) and 2 <= level <= 8
    if family == "topk":
        return isinstance(level, float) and 0 < level <= 1
    if family == "powersgd":
        return isinstance(level, int) and 1 <= level <= 4096
    return level in (None, 16)


def make_codec(name: str, level: Any = None, block: int = 256, density: float = 0.01, rank: int = 4,
               seed: int = 0) -> Codec:
    """A codec by name (or family) and options; ``level`` overrides the option it stands for."""
    family = codec_family(name) if name != "int" else "int"
    if family == "none":
        return IdentityCodec()
    if family in ("fp16", "bf16"):
        return HalfCodec(torch.float16 if family == "fp16" else torch.bfloat16)
    if family == "int":
        return BlockQuantCodec(int(level) if level is not None else int(name[3:]), block)
    if family == "topk":
        return TopKCodec(float(level) if level is not None else density)
    return PowerSGDCodec(int(level) if level is not None else rank, seed)
