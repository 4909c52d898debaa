"""DiLoCo math against hand-written references, with in-process fake communicators."""

from __future__ import annotations

import threading

import torch

from loco.optim import DiLoCo
from tests.fakes import FailingComm, ScriptedComm, SoloComm, ThreadGroup


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _inner_steps(model, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g)
        y = torch.randn(16, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_one_replica_lr1_no_momentum_equals_inner_optimizer_alone():
    a, b = _model(), _model()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    diloco = DiLoCo(a.parameters(), SoloComm(), outer_lr=1.0, momentum=0.0)
    for r in range(4):
        _inner_steps(a, opt_a, 5, seed=r)
        assert diloco.outer_step(r).applied
        _inner_steps(b, opt_b, 5, seed=r)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_several_replicas_lr1_no_momentum_is_plain_averaging_and_identical():
    n = 3
    group = ThreadGroup(n)
    models = [_model() for _ in range(n)]
    start = [p.detach().clone() for p in models[0].parameters()]
    optimizers = [DiLoCo(m.parameters(), group.member(i), outer_lr=1.0, momentum=0.0) for i, m in enumerate(models)]
    trained: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def replica(i: int) -> None:
        opt = torch.optim.SGD(models[i].parameters(), lr=0.1)
        _inner_steps(models[i], opt, 3, seed=100 + i)  # different data per replica
        trained[i] = [p.detach().clone() for p in models[i].parameters()]
        optimizers[i].outer_step(0)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for k, p0 in enumerate(start):
        expected = p0 - (sum(p0 - trained[i][k] for i in range(n)) / n)  # φ − mean(φ − θ_i)
        for i in range(n):
            torch.testing.assert_close(optimizers[i].anchor[k], expected, rtol=0, atol=1e-6)
    for i in range(1, n):  # replicas are bit-identical, not just close
        for a, b in zip(optimizers[0].synchronized_tensors(), optimizers[i].synchronized_tensors(), strict=True):
            assert torch.equal(a, b)
        for a, b in zip(models[0].parameters(), models[i].parameters(), strict=True):
            assert torch.equal(a, b)


def test_nesterov_update_matches_the_formula_and_torch_sgd():
    torch.manual_seed(1)
    phi0 = torch.randn(10)
    deltas = [torch.randn(10) for _ in range(5)]
    lr, mu = 0.7, 0.9
    p = torch.nn.Parameter(phi0.clone())
    diloco = DiLoCo([p], SoloComm(), outer_lr=lr, momentum=mu, nesterov=True)
    ref_sgd_param = torch.nn.Parameter(phi0.clone())
    sgd = torch.optim.SGD([ref_sgd_param], lr=lr, momentum=mu, nesterov=True)
    phi, buf = phi0.clone(), torch.zeros(10)
    for d in deltas:
        diloco.apply([d])
        buf = mu * buf + d  # hand-written reference (docs/ALGORITHMS.md section 1)
        phi = phi - lr * (d + mu * buf)
        ref_sgd_param.grad = d.clone()
        sgd.step()
        torch.testing.assert_close(diloco.anchor[0], phi, rtol=1e-6, atol=1e-6)
        assert torch.equal(diloco.anchor[0], ref_sgd_param.detach())  # bit for bit
        assert torch.equal(p.detach(), diloco.anchor[0])  # θ ← φ after every outer step


def test_pseudo_gradient_sign_is_old_minus_new():
    p = torch.nn.Parameter(torch.zeros(3))
    diloco = DiLoCo([p], SoloComm(), outer_lr=1.0, momentum=0.0)
    with torch.no_grad():
        p.add_(torch.tensor([1.0, -2.0, 3.0]))  # the inner steps moved θ
    (delta,) = diloco.pseudo_gradient()
    assert torch.equal(delta, torch.tensor([-1.0, 2.0, -3.0]))
    diloco.outer_step(0)
    assert torch.equal(diloco.anchor[0], torch.tensor([1.0, -2.0, 3.0]))  # φ moved toward θ


def test_incomplete_round_changes_nothing():
    p = torch.nn.Parameter(torch.ones(4))
    diloco = DiLoCo([p], FailingComm())
    with torch.no_grad():
        p.mul_(3)
    result = diloco.outer_step(0)
    assert not result.applied
    assert torch.equal(diloco.anchor[0], torch.ones(4))
    assert torch.equal(diloco.buf[0], torch.zeros(4))
    assert torch.equal(p.detach(), torch.full((4,), 3.0))  # θ keeps its local progress
    assert diloco.outer_steps == 0


def test_a_delta_after_failed_rounds_claims_their_span_and_an_adopted_state_starts_anew():
    p = torch.nn.Parameter(torch.ones(4))
    comm = ScriptedComm(fail={1, 2})
    diloco = DiLoCo([p], comm)
    for r in range(5):
        diloco.outer_step(r)
    assert comm.spans == {0: 1, 1: 1, 2: 2, 3: 3, 4: 1}  # round 3's Δ covers rounds 1-3
    comm.fail = {5}
    diloco.outer_step(5)
    diloco.load_synchronized(diloco.synchronized_tensors(), 6)  # a peer's state: its Δ starts now
    diloco.outer_step(6)
    assert comm.spans[6] == 1


def test_state_dict_round_trip_keeps_local_params():
    p = torch.nn.Parameter(torch.randn(5))
    diloco = DiLoCo([p], SoloComm())
    diloco.apply([torch.randn(5)])
    state = diloco.state_dict()
    q = torch.nn.Parameter(torch.zeros(5))
    other = DiLoCo([q], SoloComm())
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.synchronized_tensors(), diloco.synchronized_tensors(), strict=True))
    assert torch.equal(q.detach(), torch.zeros(5))  # θ is restored separately
    assert other.outer_steps == 1


def test_data_parallel_averages_gradients_and_matches_large_batch_sgd():
    """Two replicas with DataParallel on half batches == one model on the full batch."""
    from loco.optim import DataParallel

    n = 2
    group = ThreadGroup(n)
    models = [_model() for _ in range(n)]
    reference = _model()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    dps = [DataParallel(m.parameters(), group.member(i)) for i, m in enumerate(models)]

    def replica(i: int) -> None:
        loss = torch.nn.functional.mse_loss(models[i](x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4])
        loss.backward()
        assert dps[i].sync_gradients(0)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    torch.nn.functional.mse_loss(reference(x), y).backward()
    for i in range(n):
        for p, r in zip(models[i].parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
    assert not DataParallel(_model().parameters(), FailingComm()).sync_gradients(0)
