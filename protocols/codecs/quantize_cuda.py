"""Block quantization with error feedback in one CUDA kernel (Triton): the same bits as
:class:`.quantize.BlockQuantCodec` on the CPU, at memory speed.

One pass per piece reads the input and the committed residual, and writes the packed codes,
the per-block scales, the decoded values and the new residual. Eager PyTorch needs a dozen
kernels per piece for the same (add, abs, amax, divide, round, clamp, offset, cast, pack,
multiply, subtract), and at the collective's 4 MiB chunks their launches, not the memory,
set the speed.

Same bits: every floating-point step uses an explicitly rounded operation (``add_rn``,
``div_rn``, ``mul_rn``, ``sub_rn``: IEEE round-to-nearest, never contracted into a fused
multiply-add), rounding to an integer is round-half-to-even like ``torch.round``, and a
−0.0 code value becomes +0.0 as it does on the CPU (codes are offset and back).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # a CPU-only install: the eager path is used
    triton = None

ROWS = 8  # blocks per program


def available(x: torch.Tensor, bits: int, block: int) -> bool:
    """Whether the fused kernel can encode ``x``: a CUDA float32 tensor, 2, 4 or 8 bits, a
    power-of-two block of at least 8."""
    return (triton is not None and x.is_cuda and x.dtype == torch.float32 and bits in (2, 4, 8)
            and block >= 8 and block & (block - 1) == 0)


if triton is not None:

    @triton.jit
    def _encode_kernel(x_ptr, res_ptr, work_ptr, dec_ptr, packed_ptr, scale_ptr, n, nblocks, nbytes,
                       QMAX: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                       FEEDBACK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        idx = rows[:, None] * BLOCK + cols[None, :]
        inside = idx < n
        x = tl.load(x_ptr + idx, mask=inside, other=0.0)
        if FEEDBACK:  # noqa: SIM108 (a statement the Triton compiler resolves at compile time)
            fed = libdevice.add_rn(x, tl.load(res_ptr + idx, mask=inside, other=0.0))
        else:
            fed = x
        qmax = tl.full((ROWS,), QMAX, tl.float32)
        offset = tl.full((ROWS, BLOCK), QMAX + 1, tl.float32)
        scale = libdevice.div_rn(tl.max(tl.abs(fed), axis=1), qmax)
        live = scale > 0
        safe = tl.where(live, scale, 1.0)
        q = libdevice.rint(libdevice.div_rn(fed, tl.broadcast_to(safe[:, None], (ROWS, BLOCK))))
        q = tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0)
        q = tl.where(live[:, None], q, 0.0)
        shifted = libdevice.add_rn(q, offset)  # 1 .. 2·QMAX+1
        q = libdevice.sub_rn(shifted, offset)  # -0.0 -> +0.0, as the CPU's codes give back
        dec = libdevice.mul_rn(q, tl.broadcast_to(scale[:, None], (ROWS, BLOCK)))
        tl.store(dec_ptr + idx, dec, mask=inside)
        if FEEDBACK:
            tl.store(work_ptr + idx, libdevice.sub_rn(fed, dec), mask=inside)
        tl.store(scale_ptr + rows, scale, mask=rows < nblocks)
        codes = tl.where(inside, shifted.to(tl.int32), 0)  # past the end: code 0, as the CPU pads
        if BITS == 8:
            tl.store(packed_ptr + idx, codes.to(tl.uint8), mask=inside)
        else:
            PER: tl.constexpr = 8 // BITS
            grouped = tl.reshape(codes, (ROWS, BLOCK // PER, PER))
            shifts = tl.arange(0, PER) * BITS
            byte = tl.sum(grouped << shifts[None, None, :], axis=2)  # disjoint bit fields: sum = or
            out = rows[:, None] * (BLOCK // PER) + tl.arange(0, BLOCK // PER)[None, :]
            tl.store(packed_ptr + out, byte.to(tl.uint8), mask=out < nbytes)


def encode(x: torch.Tensor, residual: torch.Tensor | None, work: torch.Tensor | None, decoded: torch.Tensor,
           bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales) of ``x`` (+ ``residual`` when given; the new remainder then goes
    to ``work``), with what the receiver decodes written to ``decoded``: what
    BlockQuantCodec.encode_decoded returns for ``x + residual``. All contiguous, on one GPU."""
    n = x.numel()
    nblocks = -(-n // block)
    nbytes = -(-n * bits // 8)
    qmax = 2 ** (bits - 1) - 1
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    scale = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    feedback = residual is not None
    _encode_kernel[(triton.cdiv(nblocks, ROWS),)](
        x, residual if feedback else x, work if feedback else x, decoded, packed, scale, n, nblocks, nbytes,
        QMAX=qmax, BITS=bits, BLOCK=block, ROWS=ROWS, FEEDBACK=feedback)
    return packed, scale
