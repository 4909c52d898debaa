"""Codec throughput: encode and decode GB/s of every codec (through loco's compressor, with
error feedback where it applies) against a plain tensor copy of the same data, measured in
the same run, plus the bytes each puts on the wire.

The data is a model-like vector: ``--layers`` matrices of ``--width`` x ``--width`` and a
bias each. GB/s counts the float32 input (4 bytes per element) per second.

    python scripts/bench_codecs.py [--width 1024] [--layers 12] [--repeats 3] [--threads 0] [--device cuda]
        [--chunk-mib 4]

With ``--device cuda`` the vector, the error-feedback buffers and the encoding live on the
GPU and encode's time includes copying the wire tensors to host memory (what the transport
sends); decode runs on the CPU, as a receiver's does. Baselines then: a device-to-device
copy of the vector and a copy of it to host memory (what sending it uncompressed costs).
Quantizers and fp16/bf16 run on a GPU; the other codecs are skipped there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from loco.protocols.codecs import CODECS, Compressor, Layout  # noqa: E402

OPTIONS = {"int8": {"block": 256}, "int4": {"block": 256}, "int2": {"block": 256}, "topk": {"density": 0.01},
           "powersgd": {"rank": 4}}
CHUNK_MIB = 4  # the collective's default chunk (collective chunk_bytes)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-mib", type=int, default=CHUNK_MIB, help="encode in slices of this many MiB")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [s for _ in range(args.layers) for s in ((args.width, args.width), (args.width,))]
    layout = Layout(shapes)
    g = torch.Generator().manual_seed(0)
    host = torch.randn(layout.total, generator=g) * 1e-3
    x = host.to(device)
    gb = 4 * layout.total / 1e9
    chunk = args.chunk_mib << 18  # float32 elements
    chunks = [(lo, min(lo + chunk, layout.total)) for lo in range(0, layout.total, chunk)]
    dst = torch.empty_like(host)
    if device.type == "cuda":
        on_device = torch.empty_like(x)
        copy_s = _best(lambda: (on_device.copy_(x), torch.cuda.synchronize()), args.repeats)
        to_host_s = _best(lambda: dst.copy_(x), args.repeats)
        base = f"device copy {gb / copy_s:.1f} GB/s, copy to host {gb / to_host_s:.1f} GB/s ({torch.cuda.get_device_name()})"
    else:
        copy_s = _best(lambda: dst.copy_(x), args.repeats)
        base = f"tensor copy {gb / copy_s:.2f} GB/s"
    print(f"{layout.total / 1e6:.1f}M float32 ({gb * 1e3:.0f} MB) in {len(shapes)} tensors, "
          f"{len(chunks)} chunks of {args.chunk_mib} MiB, torch threads {torch.get_num_threads()}, {device}")
    print(f"baseline: {base}\n")
    head = f"{'codec':9} {'wire MB':>8} {'ratio':>6} {'encode GB/s':>12} {'decode GB/s':>12} " \
           f"{'enc/copy':>9} {'dec/copy':>9} {'rel. error':>10}"
    print(head)
    print("-" * len(head))
    for name in CODECS:
        if device.type != "cpu" and name not in ("none", "fp16", "bf16", "int8", "int4", "int2"):
            continue
        comp = Compressor(name, **OPTIONS.get(name, {}))
        enc_s, dec_s, wire_bytes = _measure(comp, x, dst, layout, chunks, args.repeats)
        err = float((dst - host).norm() / host.norm())
        print(f"{name:9} {wire_bytes / 1e6:8.1f} {4 * layout.total / wire_bytes:5.1f}x {gb / enc_s:12.2f} "
              f"{gb / dec_s:12.2f} {copy_s / enc_s:9.3f} {copy_s / dec_s:9.3f} {err:10.2e}")


def _measure(comp: Compressor, x: torch.Tensor, dst: torch.Tensor, layout: Layout, chunks, repeats: int
             ) -> tuple[float, float, int]:
    """Best-of-``repeats`` seconds to encode and to decode every chunk, and the wire bytes."""
    encoded: list = []

    def encode() -> None:
        encoded.clear()
        for lo, hi in chunks:
            wire, meta, _ = comp.encode("bench", x[lo:hi], lo, layout)
            encoded.append((lo, hi, wire, meta))
        comp.discard()  # every repeat starts from the same residual

    def decode() -> None:
        for lo, hi, wire, meta in encoded:
            dst[lo:hi] = comp.decode(wire, meta, lo, hi - lo, layout)

    enc_s = _best(encode, repeats)
    dec_s = _best(decode, repeats)
    return enc_s, dec_s, sum(t.numel() * t.element_size() for _, _, w, _ in encoded for t in w)


if __name__ == "__main__":
    main()
