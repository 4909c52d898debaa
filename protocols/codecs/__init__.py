"""Tensor compression for everything loco sends: codecs (one small file each), the
layer-aware compressor with error feedback, and L-GreCo's per-layer plan.

- base.py        the Codec interface, CodecError
- identity.py, half.py (fp16, bf16), quantize.py (int8/int4/int2 with block scales),
  topk.py, powersgd.py
- registry.py    names, families, valid levels
- compressor.py  layout pieces, error feedback, per-layer levels, defensive decoding
- lgreco.py      L-GreCo: per-layer levels minimizing bytes at the uniform setting's error
"""

from .base import Codec, CodecError
from .compressor import Compressor, Layout
from .identity import IdentityCodec
from .registry import CODECS, codec_family, make_codec

__all__ = ["CODECS", "Codec", "CodecError", "Compressor", "IdentityCodec", "Layout", "codec_family", "make_codec"]
