"""Streaming DiLoCo: schedule, fragments, equality with DiLoCo, overlap and mixing."""

from __future__ import annotations

import torch

from loco.node.config import ModelConfig
from loco.node.model import build_model
from loco.optim import DiLoCo, StreamingDiLoCo, strided_fragments
from loco.optim.streaming import schedule
from tests.fakes import ScriptedComm, SoloComm


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(2, 2, generator=g)]


def _step(params: list[torch.Tensor], s: int) -> None:
    g = torch.Generator().manual_seed(1000 + s)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g), alpha=0.05)


def test_schedule_staggers_fragments_and_syncs_each_once_per_h():
    H, P = 12, 3
    sends = {s: schedule(s, H, P) for s in range(0, 5 * H + 1)}
    assert sends[0] is None
    assert [s for s, p in sends.items() if p is not None][:6] == [4, 8, 12, 16, 20, 24]
    assert [sends[s] for s in (4, 8, 12, 16, 20, 24)] == [1, 2, 0, 1, 2, 0]
    for start in range(1, 4 * H):  # any window of H consecutive steps holds each fragment once
        window = [sends[s] for s in range(start, start + H) if s in sends and sends[s] is not None]
        if start + H <= 5 * H:
            assert sorted(window) == [0, 1, 2], (start, window)
    assert schedule(50, 100, 2) == 1 and schedule(100, 100, 2) == 0 and schedule(75, 100, 2) is None


def test_strided_fragments_cover_everything_and_balance_peak_bytes():
    model = build_model(ModelConfig(n_layer=4, n_embd=64, n_head=4, block_size=32))
    names, params = zip(*model.named_parameters(), strict=True)
    numels = [p.numel() for p in params]
    frags = strided_fragments(list(names), numels, 2)
    assert sorted(i for f in frags for i in f) == list(range(len(params)))
    for p, f in enumerate(frags):  # blocks p, p+2 in fragment p
        blocks = {int(names[i].split(".")[1]) for i in f if names[i].startswith("blocks.")}
        assert blocks == {p, p + 2}
    sizes = [sum(numels[i] for i in f) for f in frags]
    assert max(sizes) <= 0.6 * sum(numels)  # peak bytes per sync about 1/P of the model


def test_a_fragment_whose_sync_failed_claims_both_periods_next_time_the_others_one():
    H = 4  # two fragments: 1 sends at steps 2, 6, 10; 0 at 4, 8, 12
    comm = ScriptedComm(fail={2})
    stream = StreamingDiLoCo(_params(), comm, [[0, 1], [2]], H, overlap=1)
    for s in range(1, 3 * H + 1):
        stream.after_inner_step(s)
    stream.drain()
    assert comm.spans == {2: 1, 4: 1, 6: 2, 8: 1, 10: 1, 12: 1}


def test_one_fragment_no_overlap_equals_diloco():
    H, rounds = 5, 4
    a, b = _params(), _params()
    stream = StreamingDiLoCo(a, SoloComm(), [[0, 1, 2]], H, outer_lr=0.7, momentum=0.9, overlap=0)
    diloco = DiLoCo(b, SoloComm(), outer_lr=0.7, momentum=0.9)
    for s in range(1, rounds * H + 1):
        _step(a, s)
        _step(b, s)
        events = stream.after_inner_step(s)
        if s % H == 0:
            assert diloco.outer_step(s // H).applied
            assert [e.applied for e in events] == [True]
        else:
            assert events == []
    for x, y in zip(stream.anchor, diloco.anchor, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_overlap_applies_tau_steps_late_and_mixes():
    H, tau, mix, lr = 6, 2, 0.5, 0.7
    params = _params()
    stream = StreamingDiLoCo(params, SoloComm(), [[0, 1, 2]], H, outer_lr=lr, momentum=0.0, overlap=tau, mix=mix)
    phi = [p.clone() for p in params]
    for s in range(1, H + tau + 1):
        _step(params, s)
        if s == H:
            sent = [x - p for x, p in zip(phi, params, strict=True)]  # Δ = φ − θ at the send step
        local = [p.clone() for p in params]
        events = stream.after_inner_step(s)
        assert bool(events) == (s == H + tau)
    stream.close()
    for k in range(3):
        tilde = phi[k] - lr * sent[k]  # momentum 0: OuterSGD(φ, Δ) = φ − η·Δ
        torch.testing.assert_close(stream.anchor[k], tilde, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(params[k], mix * local[k] + (1 - mix) * tilde, rtol=1e-6, atol=1e-6)


def test_two_fragments_sync_only_their_own_parameters():
    H = 4
    params = _params()
    stream = StreamingDiLoCo(params, SoloComm(), [[0, 2], [1]], H, outer_lr=1.0, momentum=0.0, overlap=0)
    start = [p.clone() for p in params]
    for s in range(1, 3):  # fragment 1 sends at s = 2 (offset H/P)
        _step(params, s)
        events = stream.after_inner_step(s)
    assert [e.fragment for e in events] == [1]
    assert torch.equal(stream.anchor[0], start[0]) and torch.equal(stream.anchor[2], start[2])
    assert not torch.equal(stream.anchor[1], start[1])
    assert stream.fragment_steps == [0, 1]
