"""Codecs: round trips on random and adversarial tensors within each codec's documented
bound, exact byte counts, defensive decoding, error feedback, and the layer-aware
compressor."""

from __future__ import annotations

import math

import pytest
import torch

from loco.protocols.codecs import CODECS, CodecError, Compressor, Layout, make_codec
from loco.protocols.codecs.base import as_float32


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, generator=g)
    return {
        "random": base,
        "zeros": torch.zeros(1000),
        "constant": torch.full((777,), -3.25),
        "huge": base[:1000] * 1e30,
        "tiny": base[:1000] * 1e-30,
        "one": torch.tensor([2.5]),
        "empty": torch.zeros(0),
        "non_contiguous": torch.randn(40, 60, generator=g).t()[:, ::2],
        "mixed_scale": torch.cat([base[:500] * 1e-6, base[500:1000] * 1e6]),
    }


def _roundtrip(name: str, x: torch.Tensor, shape: tuple[int, int] | None = None, **kw):
    codec = make_codec(name, **kw)
    flat = as_float32(x)
    shape = shape or (1, flat.numel())
    wire, meta = codec.encode(flat, shape)
    nbytes = sum(t.numel() * t.element_size() for t in wire)
    assert nbytes == codec.wire_bytes(flat.numel(), shape), (name, nbytes)  # exact byte count
    out = codec.decode([t.clone() for t in wire], meta, flat.numel(), shape)
    assert out.dtype == torch.float32 and out.shape == (flat.numel(),)
    return flat, out, nbytes


def _block_bound(x: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    n = x.numel()
    blocks = math.ceil(n / block) if n else 0
    padded = torch.zeros(blocks * block)
    padded[:n] = x.abs()
    per_block = padded.view(blocks, block).amax(1) if blocks else torch.zeros(0)
    return per_block.repeat_interleave(block)[:n] / (2 * qmax)


@pytest.mark.parametrize("case", list(_inputs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_roundtrip_within_documented_bounds(case, dtype):
    x = _inputs()[case]
    if dtype in (torch.float16, torch.bfloat16) and case in ("huge", "tiny", "mixed_scale"):
        pytest.skip("not representable in the input dtype")
    x = x.to(dtype)
    ref = as_float32(x)
    # none: exact
    _, out, nbytes = _roundtrip("none", x)
    assert torch.equal(out, ref) and nbytes == 4 * ref.numel()
    # bf16: relative 2^-8; fp16: relative 2^-11 (absolute 2^-24 near 0), saturating at 65504
    _, out, nbytes = _roundtrip("bf16", x)
    assert nbytes == 2 * ref.numel()
    assert bool((out - ref).abs().le(ref.abs() * 2**-8 + 1e-38).all())
    _, out, _ = _roundtrip("fp16", x)
    inside = ref.abs() <= 65504
    assert bool((out - ref)[inside].abs().le(ref[inside].abs() * 2**-11 + 2**-24).all())
    assert bool((out[~inside].abs() == 65504).all())  # saturated, never inf
    # int8/int4/int2 with block scales: |err| <= max|x_block| / (2 qmax)
    for bits, qmax in ((8, 127), (4, 7), (2, 1)):
        for block in (64, 256):
            _, out, nbytes = _roundtrip(f"int{bits}", x, block=block)
            bound = _block_bound(ref, block, qmax)
            assert bool(((out - ref).abs() <= bound * (1 + 1e-6) + ref.abs() * 2**-22 + 1e-38).all()), (bits, block, case)
            assert nbytes == math.ceil(ref.numel() * bits / 8) + 4 * math.ceil(ref.numel() / block)
    # top-k: kept entries exact, every dropped entry no larger than the smallest kept one
    codec = make_codec("topk", density=0.05)
    (idx, _), meta = codec.encode(ref, (1, ref.numel()))
    _, out, nbytes = _roundtrip("topk", x, density=0.05)
    k = min(ref.numel(), max(1, round(0.05 * ref.numel()))) if ref.numel() else 0
    assert nbytes == 8 * k and idx.numel() == k
    kept = torch.zeros(ref.numel(), dtype=torch.bool)
    kept[idx.long()] = True
    assert torch.equal(out[kept], ref[kept]) and bool((out[~kept] == 0).all())
    if k and k < ref.numel():
        assert float(ref[~kept].abs().max()) <= float(ref[kept].abs().min())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("numel", [1024, 1000, 7])
def test_quantized_encode_knows_bit_for_bit_what_the_receiver_decodes(bits, numel):
    from loco.protocols.codecs.quantize import BlockQuantCodec

    codec = BlockQuantCodec(bits, block=256)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(bits)) * 3
    x[:256] = 0  # an all-zero block (scale 0) beside ordinary ones
    x[300:310] = -1e-9  # rounds to −0.0 before the offset is added: the receiver gets +0.0
    tensors, meta, decoded = codec.encode_decoded(x)
    # bytes, not values: torch.equal calls −0.0 and +0.0 equal, a weights hash does not
    assert torch.equal(decoded.view(torch.int32), codec.decode(tensors, meta, numel).view(torch.int32))
    plain, plain_meta = codec.encode(x)
    assert plain_meta == meta and all(torch.equal(a, b) for a, b in zip(plain, tensors, strict=True))


def test_powersgd_recovers_low_rank_and_never_exceeds_the_input_norm():
    g = torch.Generator().manual_seed(1)
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 48, generator=g)
    flat, out, nbytes = _roundtrip("powersgd", low, shape=(64, 48), rank=4)
    assert nbytes == 4 * 4 * (64 + 48)
    torch.testing.assert_close(out, flat, rtol=1e-4, atol=1e-4)  # rank 3 fits rank 4 exactly
    noise = torch.randn(64, 48, generator=g)
    flat, out, _ = _roundtrip("powersgd", noise, shape=(64, 48), rank=4)
    assert float((out - flat).norm()) <= float(flat.norm())  # a projection: error <= |M|
    # vectors and partial rows go dense, exactly
    flat, out, nbytes = _roundtrip("powersgd", torch.randn(50, generator=g), shape=(1, 50), rank=4)
    assert torch.equal(out, flat) and nbytes == 200


def test_powersgd_warm_start_converges_to_the_leading_subspace():
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(80, 80, generator=g))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g))
    s = torch.tensor([10.0, 8.0, 6.0, 4.0] + [0.5] * 56)
    m = (u[:, :60] * s) @ v.T
    codec = make_codec("powersgd", rank=4)
    errors = []
    for _ in range(6):
        wire, meta = codec.encode(m.reshape(-1), (80, 60), key="layer")
        errors.append(float((codec.decode(wire, meta, m.numel(), (80, 60)) - m.reshape(-1)).norm()))
    best = float(s[4:].square().sum().sqrt())  # the rank-4 truncation error
    assert errors[-1] < errors[0] and errors[-1] < 1.05 * best


@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
def test_quantized_decode_rejects_bad_metadata(name):
    codec = make_codec(name, block=64)
    wire, meta = codec.encode(torch.randn(300), (1, 300))
    codes, scale = wire
    bad = {
        "wrong size": ([codes[:-1], scale], meta, 300),
        "wrong numel": ([codes, scale], meta, 1000),
        "nan scale": ([codes, torch.full_like(scale, float("nan"))], meta, 300),
        "inf scale": ([codes, torch.full_like(scale, float("inf"))], meta, 300),
        "negative scale": ([codes, -scale.abs() - 1], meta, 300),
        "wrong block": ([codes, scale], {"block": 32}, 300),
        "wrong dtype": ([codes.to(torch.int16), scale], meta, 300),
        "missing tensor": ([codes], meta, 300),
        "2-D codes": ([codes.view(1, -1), scale], meta, 300),
    }
    for what, (tensors, m, numel) in bad.items():
        with pytest.raises(CodecError):
            codec.decode(tensors, m, numel, (1, numel))
        assert what


def test_other_decoders_reject_impossible_payloads():
    topk = make_codec("topk", density=0.1)
    (idx, val), meta = topk.encode(torch.randn(100), (1, 100))
    for tensors, m in (([idx.flip(0), val], meta), ([idx + 100, val], meta), ([idx, val[:-1]], meta),
                       ([idx, val], {"k": 3}), ([idx.to(torch.int64), val], meta)):
        with pytest.raises(CodecError):
            topk.decode(tensors, m, 100, (1, 100))
    dup = idx.clone()
    dup[1] = dup[0]
    with pytest.raises(CodecError):
        topk.decode([dup, val], meta, 100, (1, 100))
    psgd = make_codec("powersgd", rank=2)
    (p, q), meta = psgd.encode(torch.randn(40 * 30), (40, 30))
    for tensors, m, shape in (([p, q], meta, (30, 40)), ([p[:-1], q], meta, (40, 30)), ([p, q], {"mode": "x"}, (40, 30)),
                              ([p, q], {"mode": "lowrank", "rank": 3}, (40, 30))):
        with pytest.raises(CodecError):
            psgd.decode(tensors, m, 1200, shape)
    for name in ("none", "fp16", "bf16"):
        c = make_codec(name)
        with pytest.raises(CodecError):
            c.decode([torch.zeros(5)], {}, 6, (1, 6))


def test_every_registered_codec_has_a_working_compressor():
    layout = Layout([(32, 16), (16,), (8, 4, 2)])
    x = torch.randn(layout.total)
    for name in CODECS:
        comp = Compressor(name)
        wire, meta, decoded = comp.encode("s", x[5:500], 5, layout)
        out = comp.decode([t.clone() for t in wire], meta, 5, 495, layout)
        assert torch.equal(out, decoded), name
        with pytest.raises(CodecError):  # the receiver's own piece split must match
            comp.decode(wire, meta, 6, 494, layout)
        with pytest.raises(CodecError):
            comp.decode(wire, {"pieces": "nope"}, 5, 495, layout)
        with pytest.raises(CodecError):
            comp.decode([*wire, torch.zeros(1)], meta, 5, 495, layout)


def test_compressor_decodes_at_the_level_the_sender_used():
    layout = Layout([(64, 8), (64, 8)])
    sender, receiver = Compressor("int4"), Compressor("int4")
    sender.plan = {0: 8, 1: 2}  # L-GreCo-style levels per layer; the receiver has none
    x = torch.randn(layout.total)
    wire, meta, decoded = sender.encode("s", x, 0, layout)
    assert [e[1] for e in meta["pieces"]] == [8, 2]
    assert torch.equal(receiver.decode(wire, meta, 0, layout.total, layout), decoded)
    meta["pieces"][0][1] = 3  # not a valid bit width
    with pytest.raises(CodecError):
        receiver.decode(wire, meta, 0, layout.total, layout)


def test_layout_pieces_split_at_layers_and_rows():
    layout = Layout([(4, 5), (7,), (3, 2)])
    assert layout.total == 33
    pieces = layout.pieces(2, 30, whole_rows=True)
    assert [(p.layer, p.lo, p.hi, p.shape) for p in pieces] == [
        (0, 2, 5, (1, 3)), (0, 5, 20, (3, 5)), (1, 20, 27, (7, 1)), (2, 27, 29, (1, 2)), (2, 29, 30, (1, 1))]
    assert sum(p.hi - p.lo for p in layout.pieces(0, 33)) == 33


@pytest.mark.parametrize("name,kw", [("topk", {"density": 0.05}), ("int4", {"block": 64}), ("int2", {})])
def test_error_feedback_makes_repeated_sends_sum_to_the_truth(name, kw):
    """Sending the same signal n times: with error feedback the sum's error stays bounded
    (its relative error falls like 1/n); without, it grows with n (relative error flat)."""
    g = torch.Generator().manual_seed(3)
    signal = torch.randn(2000, generator=g) * 0.1
    layout = Layout([signal.shape])
    rel = {}
    for ef in (True, False):
        comp = Compressor(name, error_feedback=ef, **kw)
        total = torch.zeros_like(signal)
        for n in range(1, 501):
            _, _, decoded = comp.encode("s", signal, 0, layout)
            comp.commit()
            total += decoded
            if n in (100, 500):
                rel[(ef, n)] = float((total - n * signal).norm() / (n * signal.norm()))
    assert rel[(True, 500)] < 0.3 * rel[(True, 100)]  # bounded residual: 5x the rounds, ~1/5 the error
    assert rel[(True, 500)] < 0.02
    assert rel[(False, 500)] > 0.9 * rel[(False, 100)]  # the dropped part piles up with every round
    assert rel[(False, 500)] > 10 * rel[(True, 500)]


def test_discarded_round_does_not_apply_the_residual_twice():
    layout = Layout([(100,)])
    x = torch.randn(100)
    comp = Compressor("topk", density=0.05)
    _, _, first = comp.encode("s", x, 0, layout)
    comp.discard()  # the round was redone: the same input again sees the same (empty) residual
    _, _, again = comp.encode("s", x, 0, layout)
    assert torch.equal(first, again)
    comp.commit()
    _, _, third = comp.encode("s", x, 0, layout)
    assert not torch.equal(third, first)  # now the remainder of the used round is added


def test_residual_and_plan_are_part_of_the_state():
    layout = Layout([(50, 4)])
    comp = Compressor("powersgd", rank=1)
    comp.plan = {0: 2}
    for _ in range(2):
        comp.encode("s", torch.randn(200), 0, layout)
        comp.commit()
    state = comp.state_dict()
    other = Compressor("powersgd", rank=1)
    other.load_state_dict(state)
    assert other.plan == {0: 2}
    x = torch.randn(200)
    assert torch.equal(comp.encode("s", x, 0, layout)[2], other.encode("s", x, 0, layout)[2])


def test_a_rank_holds_remainders_of_the_stretch_it_encodes_only():
    """A rank encodes its region of a 10 000-long vector: its remainders span that region
    (committed and staged), not the whole vector; a slice beyond it grows the span and keeps
    what it held, which then feeds back exactly as a whole-length remainder would."""
    layout = Layout([(100, 100)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g)
    whole, region = Compressor("int8", block=64), Compressor("int8", block=64)
    whole.encode("s", x, 0, layout)
    region.encode("s", x[6400:8000], 6400, layout)  # (at a block boundary: the same blocks as the whole's)
    whole.commit()
    region.commit()
    assert region.residual_bytes == 2 * 4 * 1600 and whole.residual_bytes == 2 * 4 * 10_000
    # the same remainders where both encoded: the next encoding of [6400, 8000) sends the same bits
    y = torch.randn(10_000, generator=g)
    assert torch.equal(whole.encode("s", y[6400:8000], 6400, layout)[2],
                       region.encode("s", y[6400:8000], 6400, layout)[2])
    whole.discard()
    region.discard()
    region.encode("s", y[1000:1500], 1000, layout)  # outside: the span grows to [1000, 8000)
    region.commit()
    assert region.residual_bytes == 2 * 4 * 7000
    assert torch.equal(whole.encode("s", y[6400:8000], 6400, layout)[2],
                       region.encode("s", y[6400:8000], 6400, layout)[2])
    # saved and loaded with its position; a whole-length state from before the spans loads too
    other = Compressor("int8", block=64)
    other.load_state_dict(region.state_dict())
    assert torch.equal(other.encode("s", y[6400:8000], 6400, layout)[2],
                       region.encode("s", y[6400:8000], 6400, layout)[2])
    old = {"residual": {"s": torch.zeros(10_000)}, "plan": {}}
    other.load_state_dict(old)
    assert other.residual_bytes == 2 * 4 * 10_000
    with pytest.raises(ValueError, match="do not fit its 100-long vector"):
        other.load_state_dict({"residual": {"s": torch.zeros(50)}, "residual_at": {"s": [60, 100]}})
