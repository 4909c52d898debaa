"""What a collective or a gossip exchange calls: a codec applied layer by layer, with
error feedback and (optionally) a per-layer level plan from L-GreCo.

Messages carry slices of a flat float32 vector made of the caller's tensors laid end to
end (the ``Layout``). A slice is cut at layer boundaries into pieces, and, for low-rank
codecs, at row boundaries too, so every piece has a 2-D (rows, cols) view of its layer.
Each piece is encoded at its layer's level; the message meta lists, per piece, how many
wire tensors it has and at which level it was encoded, and the receiver checks that
against the pieces it computes itself before decoding anything.

Error feedback (on by default for lossy codecs): per stream (what is being sent: this
node's contribution, or the part it averaged), a flat residual holds what the codec
dropped, over the stretch of the vector this process encodes (residual.py: a rank of a
member of several processes holds its region's only); it is added before the next encoding of the same positions and replaced by the
new remainder. New remainders are staged until the caller says the values it sent were
used (``commit``: the round completed) or not (``discard``: a retried or aborted round
re-encodes the same input, which must see the old residual, not add it twice). The
residual is part of the checkpoint (``state_dict``).

Device: the input may live on a GPU. The residual, the work buffer and the decoded values
then stay there, and only the wire tensors (a fraction of the input for a quantizer) are
copied to host memory for the transport: the same bits as an encoding on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import Codec, CodecError, as_float32
from .registry import codec_family, make_codec, valid_level
from .residual import Residuals


@dataclass(frozen=True)
class Piece:
    layer: int
    lo: int  # flat offsets, global
    hi: int
    shape: tuple[int, int]  # (rows, cols) view of the piece


class Layout:
    """Tensors laid end to end in one flat vector: their shapes, offsets and 2-D views."""

    def __init__(self, shapes: Sequence[Sequence[int]]):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.numels = [math.prod(s) for s in self.shapes]
        self.starts = [0]
        for n in self.numels:
            self.starts.append(self.starts[-1] + n)
        self.total = self.starts[-1]
        self.cols = [math.prod(s[1:]) if len(s) > 1 else 1 for s in self.shapes]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> Layout:
        return cls([t.shape for t in tensors])

    def pieces(self, lo: int, hi: int, whole_rows: bool = False) -> list[Piece]:
        out = []
        for layer, (start, numel) in enumerate(zip(self.starts, self.numels, strict=False)):
            a, b = max(lo, start), min(hi, start + numel)
            if a >= b:
                continue
            cols = self.cols[layer]
            if not whole_rows:
                n = b - a
                view = (n // cols, cols) if (a - start) % cols == 0 and n % cols == 0 else (1, n)
                out.append(Piece(layer, a, b, view))
                continue
            head = min(b, start + math.ceil((a - start) / cols) * cols)
            tail = max(head, start + ((b - start) // cols) * cols)
            for x, y in ((a, head), (head, tail), (tail, b)):
                if x < y:
                    rows_ok = (x - start) % cols == 0 and (y - x) % cols == 0
                    out.append(Piece(layer, x, y, ((y - x) // cols, cols) if rows_ok else (1, y - x)))
        return out


class Compressor:
    def __init__(self, codec: str = "none", error_feedback: bool = True, **options: Any):
        self.family = codec_family(codec)
        self.options = options
        self.base: Codec = make_codec(codec, **options)
        self.lossy = self.base.lossy
        self.error_feedback = error_feedback and self.lossy
        self.plan: dict[int, Any] = {}  # layer -> level (L-GreCo); missing layers use the base level
        self._codecs: dict[Any, Codec] = {self.base.level: self.base}
        self._residuals = Residuals()  # committed and staged remainders, per stream
        self._touched: list[tuple[str, int, int]] = []
        self.encode_s = 0.0  # time spent encoding and decoding, for the metrics
        self.decode_s = 0.0

    @property
    def name(self) -> str:
        return self.base.name

    def codec_at(self, level: Any) -> Codec:
        if level not in self._codecs:
            if not valid_level(self.family, level):
                raise CodecError(f"{self.family}: level {level!r} is not valid")
            self._codecs[level] = make_codec(self.family, level=level, **self.options)
        return self._codecs[level]

    def level_of(self, layer: int) -> Any:
        return self.plan.get(layer, self.base.level)

    def _pieces(self, layout: Layout, lo: int, hi: int) -> list[Piece]:
        return layout.pieces(lo, hi, whole_rows=getattr(self.base, "needs_rows", False))

    @property
    def residual_bytes(self) -> int:
        """Bytes of error-feedback remainders held (committed and staged)."""
        return self._residuals.held_bytes

    def commit(self) -> None:
        """The values encoded since the last commit/discard were used: keep their remainders."""
        for stream, lo, hi in self._touched:
            self._residuals.commit(stream, lo, hi)
        self._touched.clear()

    def discard(self) -> None:
        """They were not used (round skipped or redone): the old residual stays."""
        self._touched.clear()

    def encode(self, stream: str, x: torch.Tensor, lo: int, layout: Layout
               ) -> tuple[list[torch.Tensor], dict[str, Any], torch.Tensor]:
        """Encode the slice ``x`` = flat[lo:lo+len(x)]. Returns wire tensors, meta and what
        the receiver will decode (used for the error feedback, and by an owner that must
        hold exactly what it sends)."""
        t0 = time.perf_counter()
        x = as_float32(x)
        if not self.lossy:
            self.encode_s += time.perf_counter() - t0
            return [x.cpu()], {"pieces": [[1, None, {}]], "span": [lo, x.numel()]}, x
        hi = lo + x.numel()
        pieces = self._pieces(layout, lo, hi)
        levels = [self.level_of(p.layer) for p in pieces]
        codecs = [self.codec_at(level) for level in levels]
        # one kernel per piece does the feedback, the encoding and the new remainder (GPU)
        fused = all(getattr(c, "fusable", None) is not None and c.fusable(x) for c in codecs)
        fed, staged, committed = x, None, None
        if self.error_feedback:
            # x + residual goes straight into the work buffer, whose slice then becomes the new
            # residual in place: no fresh model-sized temporaries (their page faults cost more
            # than the arithmetic). A wire tensor that is a view of it (a codec's dense
            # fallback) is copied below, before the buffer is rewritten.
            committed, staged = self._residuals.slices(stream, layout.total, lo, hi, x.device)
            if not fused:
                fed = torch.add(x, committed, out=staged)
        aliased = staged.untyped_storage().data_ptr() if staged is not None else None
        wire: list[torch.Tensor] = []
        metas: list[list[Any]] = []
        decoded = torch.empty_like(fed)
        for p, level, codec in zip(pieces, levels, codecs, strict=True):
            part = fed[p.lo - lo:p.hi - lo]
            if fused:
                tensors, meta = codec.encode_fused(
                    part, None if committed is None else committed[p.lo - lo:p.hi - lo],
                    None if staged is None else staged[p.lo - lo:p.hi - lo], decoded[p.lo - lo:p.hi - lo])
            elif getattr(codec, "needs_rows", False):
                tensors, meta = codec.encode(part, p.shape, key=(stream, p.lo))
                decoded[p.lo - lo:p.hi - lo] = codec.decode(tensors, meta, p.hi - p.lo, p.shape)
            elif hasattr(codec, "encode_decoded"):  # the codec knows what it sent: no second pass
                tensors, meta, decoded[p.lo - lo:p.hi - lo] = codec.encode_decoded(part, p.shape)
            else:
                tensors, meta = codec.encode(part, p.shape)
                decoded[p.lo - lo:p.hi - lo] = codec.decode(tensors, meta, p.hi - p.lo, p.shape)
            if aliased is not None:
                tensors = [t.clone() if t.untyped_storage().data_ptr() == aliased else t for t in tensors]
            if fed.device.type == "cuda":  # to page-locked host memory, all copies in flight at once
                tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                           for t in tensors]
            elif fed.device.type != "cpu":
                tensors = [t.cpu() for t in tensors]
            wire += tensors
            metas.append([len(tensors), level, meta])
        if staged is not None:
            if not fused:
                staged.sub_(decoded)
            self._touched.append((stream, lo, hi))
        if fed.device.type == "cuda":
            torch.cuda.current_stream(fed.device).synchronize()  # the host copies of the wire tensors
        self.encode_s += time.perf_counter() - t0
        return wire, {"pieces": metas, "span": [lo, hi - lo]}, decoded

    def decode(self, tensors: list[torch.Tensor], meta: dict[str, Any], lo: int, numel: int,
               layout: Layout) -> torch.Tensor:
        """Rebuild flat[lo:lo+numel] from a message, or raise CodecError."""
        t0 = time.perf_counter()
        try:
            return self._decode(tensors, meta, lo, numel, layout)
        except CodecError:
            raise
        except Exception as exc:  # a peer's metadata steered a codec into an error: its fault, not ours
            raise CodecError(f"undecodable part: {type(exc).__name__}: {str(exc)[:200]}") from None
        finally:
            self.decode_s += time.perf_counter() - t0

    def _decode(self, tensors, meta, lo, numel, layout) -> torch.Tensor:
        entries = meta.get("pieces") if isinstance(meta, dict) else None
        if not isinstance(entries, list):
            raise CodecError("codec metadata has no piece list")
        if meta.get("span") != [lo, numel]:  # the sender encoded another slice than expected here
            raise CodecError(f"slice {meta.get('span')!r} sent, [{lo}, {numel}] expected")
        if not self.lossy:
            if len(entries) != 1 or len(tensors) != 1:
                raise CodecError(f"uncompressed part must be 1 tensor, got {len(tensors)}")
            return self.base.decode(tensors, {}, numel, (1, numel))
        if lo < 0 or lo + numel > layout.total:
            raise CodecError(f"slice [{lo}, {lo + numel}) outside a vector of {layout.total}")
        pieces = self._pieces(layout, lo, lo + numel)
        if len(entries) != len(pieces):
            raise CodecError(f"{len(entries)} pieces in the message, {len(pieces)} expected")
        out = torch.empty(numel, dtype=torch.float32)
        offset = 0
        for p, entry in zip(pieces, entries, strict=True):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int)
                    and isinstance(entry[2], dict)):
                raise CodecError(f"malformed piece entry {entry!r}")
            count, level, piece_meta = entry
            if count < 0 or offset + count > len(tensors):
                raise CodecError(f"piece needs {count} tensors, {len(tensors) - offset} left")
            codec = self.codec_at(level)
            out[p.lo - lo:p.hi - lo] = codec.decode(list(tensors[offset:offset + count]), piece_meta,
                                                    p.hi - p.lo, p.shape)
            offset += count
        if offset != len(tensors):
            raise CodecError(f"{len(tensors) - offset} extra tensors in the message")
        return out

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {**self._residuals.state_dict(), "plan": dict(self.plan)}
        warm = {lvl: c.state_dict() for lvl, c in self._codecs.items() if hasattr(c, "state_dict")}
        if warm:
            state["warm"] = warm
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._residuals.load_state_dict(state)
        self._touched.clear()
        self.plan = dict(state.get("plan", {}))
        for lvl, s in state.get("warm", {}).items():
            codec = self.codec_at(lvl)
            if hasattr(codec, "load_state_dict"):
                codec.load_state_dict(s)
