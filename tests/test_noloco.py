"""NoLoCo's outer step against hand-written references, with in-process fake groups."""

from __future__ import annotations

import threading

import torch

from loco.optim import DiLoCo, NoLoCo
from tests.fakes import GroupedThreads, ThreadGroup


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 4, generator=g), torch.randn(7, generator=g)]


def _local_progress(params: list[torch.Tensor], rank: int, round: int) -> None:
    """A deterministic stand-in for H inner steps: different per replica and round."""
    g = torch.Generator().manual_seed(1000 * round + rank)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g), alpha=0.1)


def _run_threads(n: int, body) -> None:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            body(i)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_whole_swarm_group_equals_diloco_without_nesterov():
    n, rounds, mu, eta = 3, 4, 0.6, 0.8
    noloco_params = [_params(0) for _ in range(n)]
    diloco_params = [_params(0) for _ in range(n)]
    everyone = GroupedThreads(n, lambda r: [list(range(n))])
    allreduce = ThreadGroup(n)
    nl = [NoLoCo(noloco_params[i], everyone.member(i), alpha=mu, beta=eta, gamma=0.7) for i in range(n)]
    dl = [DiLoCo(diloco_params[i], allreduce.member(i), outer_lr=eta, momentum=mu, nesterov=False)
          for i in range(n)]

    def replica(i: int) -> None:
        for r in range(rounds):
            _local_progress(noloco_params[i], i, r)
            _local_progress(diloco_params[i], i, r)
            res = nl[i].outer_step(r)
            assert res.applied and res.group_size == n
            assert dl[i].outer_step(r).applied

    _run_threads(n, replica)
    for i in range(n):
        for a, b in zip(nl[i].anchor, dl[i].anchor, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # identical φ everywhere: the γ term was 0 and drift is 0
        for a, b in zip(nl[i].anchor, nl[0].anchor, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_alpha_gamma_zero_averages_pseudo_gradients_within_pairs():
    n = 4
    params = [_params(i) for i in range(n)]  # different φ per replica
    pairs = GroupedThreads(n, lambda r: [[0, 2], [1, 3]])
    opts = [NoLoCo(params[i], pairs.member(i), alpha=0.0, beta=1.0, gamma=0.0) for i in range(n)]
    phi0 = [[a.clone() for a in o.anchor] for o in opts]
    thetas: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def replica(i: int) -> None:
        _local_progress(params[i], i, 0)
        thetas[i] = [p.clone() for p in params[i]]
        assert opts[i].outer_step(0).group_size == 2

    _run_threads(n, replica)
    for i, j in [(0, 2), (2, 0), (1, 3), (3, 1)]:
        for k in range(2):
            want = phi0[i][k] + ((thetas[i][k] - phi0[i][k]) + (thetas[j][k] - phi0[j][k])) / 2
            torch.testing.assert_close(opts[i].anchor[k], want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(params[i][k], want, rtol=1e-6, atol=1e-6)  # θ ← φ


def test_full_rule_with_momentum_against_reference():
    n, rounds, alpha, beta, gamma = 2, 3, 0.5, 0.7, 0.7
    params = [_params(10 + i) for i in range(n)]
    pair = GroupedThreads(n, lambda r: [[0, 1]])
    opts = [NoLoCo(params[i], pair.member(i), alpha, beta, gamma) for i in range(n)]
    # reference, by hand
    phi = [[p.clone() for p in _params(10 + i)] for i in range(n)]
    delta = [[torch.zeros_like(p) for p in phi[i]] for i in range(n)]
    drifts = []
    for r in range(rounds):
        theta = [[p.clone() for p in phi[i]] for i in range(n)]
        for i in range(n):
            _local_progress(theta[i], i, r)
        new_phi = []
        for i in range(n):
            out = []
            for k in range(2):
                phi_bar = (phi[0][k] + phi[1][k]) / 2
                d_bar = ((theta[0][k] - phi[0][k]) + (theta[1][k] - phi[1][k])) / 2
                delta[i][k] = alpha * delta[i][k] + beta * d_bar - gamma * (phi[i][k] - phi_bar)
                out.append(phi[i][k] + delta[i][k])
            new_phi.append(out)
        drifts.append(sum(float((phi[0][k] - (phi[0][k] + phi[1][k]) / 2).square().sum()) for k in range(2)) ** 0.5)
        phi = new_phi
    got_drift = []

    def replica(i: int) -> None:
        for r in range(rounds):
            _local_progress(params[i], i, r)
            res = opts[i].outer_step(r)
            if i == 0:
                got_drift.append(res.extra["drift"])
                assert res.extra["partners"] == ["1"]

    _run_threads(n, replica)
    for i in range(n):
        for k in range(2):
            torch.testing.assert_close(opts[i].anchor[k], phi[i][k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got_drift), torch.tensor(drifts), rtol=1e-5, atol=1e-7)
    assert got_drift[0] > 0  # the replicas started apart: the γ term had work to do


def test_absent_partner_gives_local_only_momentum_step():
    alpha, beta = 0.5, 0.7
    params = _params(3)
    pair = GroupedThreads(2, lambda r: [[0, 1]], absent=frozenset({1}), timeout_s=0.2)
    opt = NoLoCo(params, pair.member(0), alpha, beta, gamma=0.7)
    phi = [p.clone() for p in params]
    _local_progress(params, 0, 0)
    theta = [p.clone() for p in params]
    res = opt.outer_step(0)
    assert not res.applied and res.group_size == 1
    for k in range(2):  # δ = α·0 + β·(θ − φ) − γ·0
        torch.testing.assert_close(opt.anchor[k], phi[k] + beta * (theta[k] - phi[k]), rtol=1e-6, atol=1e-6)


def test_gamma_keeps_replicas_together():
    """Four replicas with diverging local progress: the spread of φ stays smaller with γ."""
    def spread(gamma: float) -> float:
        n = 4
        params = [_params(0) for _ in range(n)]
        rotating = GroupedThreads(n, lambda r: [[0, 1 + r % 3], [x for x in (1, 2, 3) if x != 1 + r % 3]])
        opts = [NoLoCo(params[i], rotating.member(i), 0.5, 0.7, gamma) for i in range(n)]

        def replica(i: int) -> None:
            for r in range(8):
                with torch.no_grad():
                    for p in params[i]:
                        p.add_(0.05 * (i - 1.5))  # each replica drifts its own way
                _local_progress(params[i], i, r)
                opts[i].outer_step(r)

        _run_threads(n, replica)
        stacked = torch.stack([torch.cat([a.reshape(-1) for a in o.anchor]) for o in opts])
        return float(stacked.std(0).mean())

    assert spread(0.7) < 0.8 * spread(0.0)
