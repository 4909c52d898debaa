"""CO2's outer step against a hand-written reference; clipping; the thread handoff."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loco.optim import CO2
from loco.optim.co2 import WholeTensors
from tests.fakes import DelayedComm, FailingComm, SoloComm, ThreadGroup


def _params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 5, generator=g), torch.randn(5, generator=g)]


def _train(params: list[torch.Tensor], rank: int, round: int) -> None:
    """Stand-in for τ inner steps: pull towards a per-replica, per-round target."""
    g = torch.Generator().manual_seed(97 * round + rank + 1)
    with torch.no_grad():
        for p in params:
            p.sub_(0.3 * (p - torch.randn(p.shape, generator=g)))


def _reference(n: int, rounds: int, eta: float, beta: float, clip: float) -> list[torch.Tensor]:
    """The formula of docs/ALGORITHMS.md section 4 with λ = 1, written out directly."""
    x = _params()
    m = [torch.zeros_like(t) for t in x]
    pending = None
    for t in range(rounds):
        deltas = []
        for i in range(n):
            theta = [p.clone() for p in x]
            _train(theta, i, t)
            deltas.append([a - b for a, b in zip(x, theta, strict=True)])
        mean = [torch.stack([d[k] for d in deltas]).mean(0) for k in range(len(x))]
        if pending is not None:
            for k in range(len(x)):
                m[k] = beta * m[k] + pending[k]
                if clip:
                    m[k] = m[k].clamp(-clip, clip)
                x[k] = x[k] - eta * m[k]
        pending = mean
    return x


def _run(n: int, rounds: int, make_comm, background: bool, train_jitter_s: float = 0.0,
         group: ThreadGroup | None = None, **kw) -> list[CO2]:
    replicas = [_params() for _ in range(n)]
    opts = [CO2(replicas[i], make_comm(i), staleness="fixed", penalty=1.0, background=background, **kw)
            for i in range(n)]
    errors: list[BaseException] = []

    def replica(i: int) -> None:
        rng = random.Random(i)
        try:
            for t in range(rounds):
                _train(replicas[i], i, t)
                time.sleep(rng.uniform(0, train_jitter_s))
                opts[i].outer_step(t)
                # the training thread writes θ while the reduce runs: it must not see the buffer
                with torch.no_grad():
                    for p in replicas[i]:
                        p.add_(0.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a replica is still running after 120 s"
    assert not errors, errors
    if group is not None:
        group.wait_done(rounds - 1)  # every replica's last reduce ran: closing cancels one not started
    for o in opts:
        o.close()
    return opts


@pytest.mark.parametrize("background", [False, True])
def test_outer_step_matches_formula_step_by_step(background):
    n, rounds, eta, beta = 3, 6, 1.0, 0.5
    group = ThreadGroup(n)
    opts = _run(n, rounds, group.member, background, group=group, outer_lr=eta, momentum=beta, clip=0.0)
    want = _reference(n, rounds, eta, beta, clip=0.0)
    for o in opts:
        for a, b in zip(o.anchor, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(o.outer_steps == rounds - 1 for o in opts)  # the first round applies nothing


def test_race_free_handoff_with_random_delays_on_both_sides():
    """Many rounds, random sleeps in the communicator and in training: the threaded run
    ends where the sequential formula does."""
    n, rounds = 3, 40
    group = ThreadGroup(n)
    opts = _run(n, rounds, lambda i: DelayedComm(group.member(i), seed=i, max_delay_s=0.01), True,
                train_jitter_s=0.01, group=group, outer_lr=0.9, momentum=0.2, clip=0.5)
    want = _reference(n, rounds, 0.9, 0.2, clip=0.5)
    for o in opts:
        for a, b in zip(o.anchor, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clipping_really_clips_in_place():
    params = _params()
    opt = CO2(params, SoloComm(), outer_lr=1.0, momentum=0.0, clip=0.01, staleness="fixed", background=False)
    m_objects = [id(m) for m in opt.m]
    before = [a.clone() for a in opt.anchor]
    for t in range(2):
        _train(params, 0, t)
        opt.outer_step(t)
    assert [id(m) for m in opt.m] == m_objects  # the state tensors themselves were clamped
    assert max(float(m.abs().max()) for m in opt.m) <= 0.01
    assert any(float(m.abs().max()) == pytest.approx(0.01) for m in opt.m)  # the clip was active
    for a, b in zip(opt.anchor, before, strict=True):  # one applied step moved at most η·c
        assert float((a - b).abs().max()) <= 0.01 + 1e-7


def test_gap_aware_penalty_is_at_least_one_and_grows_with_the_gap():
    params = _params()
    opt = CO2(params, SoloComm(), outer_lr=1.0, momentum=0.0, clip=0.0, staleness="gap_aware",
              background=False)
    penalties = []
    for t in range(6):
        _train(params, 0, t)
        if t == 3:  # a big local jump: the next applied step sees a large gap
            with torch.no_grad():
                for p in params:
                    p.add_(5.0)
        penalties.append(opt.outer_step(t).extra["penalty"])
    flat = [x for p in penalties for x in p]
    assert flat and min(flat) >= 1.0
    assert max(penalties[5]) > 1.5  # after the jump was applied, the gap dwarfs typical steps


def _gap_reference(rounds: int, jump_round: int) -> tuple[list[torch.Tensor], list[list[float]]]:
    """Gap-aware CO2 of one replica (the mean is its own Δ; η = 1, β = 0, no clipping), λ,
    m and x written out with float64 norms per tensor: λ_t = max(1, η‖m_{t−1}‖ / (Σ_k ‖ḡ_k‖ / t))."""
    x = [t.clone() for t in _big_params()]
    m = [torch.zeros_like(t) for t in x]
    gap, sum_g, steps, pending, penalties = [0.0] * len(x), [0.0] * len(x), 0, None, []
    for t in range(rounds):
        theta = [p.clone() for p in x]
        _train(theta, 0, t)
        if t == jump_round:
            theta = [p + 5.0 for p in theta]
        delta = [a - b for a, b in zip(x, theta, strict=True)]
        if pending is not None:
            lam = []
            for k, g in enumerate(pending):
                sum_g[k] += float(g.double().norm())
                typical = sum_g[k] / (steps + 1)
                lam.append(max(1.0, gap[k] / typical) if typical > 0 else 1.0)
                m[k] = g / lam[k]
                x[k] = x[k] - m[k]
                gap[k] = float(m[k].double().norm())
            penalties.append(lam)
            steps += 1
        pending = delta
    return x, penalties


def _big_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(300, 200, generator=g), torch.randn(200, generator=g), torch.randn(70, 3, generator=g)]


def _gap_aware(params: list[torch.Tensor]) -> CO2:
    return CO2(params, SoloComm(), outer_lr=1.0, momentum=0.0, clip=0.0, staleness="gap_aware", background=False)


def _train_jumping(params: list[torch.Tensor], t: int, jump_round: int) -> None:
    _train(params, 0, t)
    if t == jump_round:  # a big local jump: the step that applies it makes a large gap
        with torch.no_grad():
            for p in params:
                p.add_(5.0)


def test_gap_aware_penalties_follow_the_formula():
    rounds, jump = 7, 3
    params = _big_params()
    opt = _gap_aware(params)
    got = []
    for t in range(rounds):
        _train_jumping(params, t, jump)
        got.append(opt.outer_step(t).extra["penalty"])
    want_x, want_penalties = _gap_reference(rounds, jump)
    got = [p for p in got if p]  # (the first round applies nothing)
    assert len(got) == len(want_penalties)
    for a, b in zip(got, want_penalties, strict=True):  # norms rounded to 16 bits: λ within 2^-15
        assert a == pytest.approx(b, rel=2 ** -14)
    assert max(max(p) for p in got) > 1.5  # the jump's gap was penalized
    for a, b in zip(opt.anchor, want_x, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gap_aware_over_regions_of_the_flat_weights_is_bit_identical_to_one_process():
    """A sharded member's ranks each update a region of the flat weight vector (cutting the
    model's tensors anywhere; a rank's region may be empty) and sum their pieces' squares
    over the ranks: the weights, momentum and statistics come out bit for bit those of one
    process over whole tensors."""
    rounds, jump = 7, 3
    whole_params = _big_params()
    one = _gap_aware(whole_params)
    flat = torch.cat([p.reshape(-1) for p in whole_params])
    ends = torch.tensor([p.numel() for p in whole_params]).cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    bounds = [0, 20_011, 60_107, flat.numel(), flat.numel()]  # cutting the first tensor twice; the last empty
    n = len(bounds) - 1
    slots: list[list[float] | None] = [None] * n
    barrier = threading.Barrier(n)

    def summed_over_ranks(r: int):
        def sum_partials(partials: list[float]) -> list[float]:
            slots[r] = partials
            barrier.wait()
            out = [sum(col) for col in zip(*slots, strict=True)]
            barrier.wait()
            return out
        return sum_partials

    regions, maths, seen = [], [], []
    for r, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        regions.append(flat[a:b].clone())
        maths.append(_gap_aware([regions[r]]))
        pieces = [(i, max(s, a) - a, min(e, b) - a) for i, (s, e) in enumerate(zip(starts, ends, strict=True))
                  if max(s, a) < min(e, b)]
        maths[r].measure_whole_tensors(WholeTensors(len(whole_params), [pieces], summed_over_ranks(r)))
    for t in range(rounds):
        _train_jumping(whole_params, t, jump)
        trained = torch.cat([p.reshape(-1) for p in whole_params])
        for r, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            regions[r].copy_(trained[a:b])
        with ThreadPoolExecutor(n) as pool:  # (the ranks sum their squares together)
            running = [pool.submit(maths[r].outer_step, t) for r in range(n)]
            want = one.outer_step(t)
            results = [f.result(timeout=60) for f in running]
        assert all(res.extra["penalty"] == want.extra["penalty"] for res in results)
        seen += want.extra["penalty"]
    for section in (lambda o: o.anchor, lambda o: o.m):
        whole = torch.cat([x.reshape(-1) for x in section(one)])
        assert torch.equal(torch.cat([section(o)[0] for o in maths]), whole)
    assert all(torch.equal(o.stats, one.stats) for o in maths)
    assert max(seen) > 1.5  # (the penalty was at work)


def test_failed_reduce_changes_nothing():
    params = _params()
    opt = CO2(params, FailingComm(), background=True)
    start = [a.clone() for a in opt.anchor]
    for t in range(3):
        _train(params, 0, t)
        res = opt.outer_step(t)
        assert not res.applied
    opt.close()
    for a, b in zip(opt.anchor, start, strict=True):
        assert torch.equal(a, b)


def test_adopted_state_applies_the_missed_reduce():
    """A replica that adopts a peer's state mid-pipeline applies the mean it missed."""
    a_params, b_params = _params(), _params()
    a = CO2(a_params, SoloComm(), staleness="fixed", background=False, clip=0.0)
    _train(a_params, 0, 0)
    a.outer_step(0)  # launches round 0 (in sequential mode: its result is held)
    missed = a._sync_result
    state = [t.clone() for t in a.synchronized_tensors()]
    b = CO2(b_params, SoloComm(), staleness="fixed", background=False, clip=0.0)
    b.load_synchronized(state, a.outer_steps, pending=lambda: missed)
    for opt, params in ((a, a_params), (b, b_params)):
        _train(params, 0, 1)
        assert opt.outer_step(1).applied
    for x, y in zip(a.anchor, b.anchor, strict=True):
        assert torch.equal(x, y)


def test_flush_applies_the_last_reduce_and_launches_nothing():
    params = _params()
    opt = CO2(params, SoloComm(), staleness="fixed", background=True, clip=0.0)
    for t in range(3):
        _train(params, 0, t)
        opt.outer_step(t)
    before = [a.clone() for a in opt.anchor]
    final = opt.flush()
    assert final is not None and final.applied and final.extra["stale_round"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(opt.anchor, before, strict=True))
    assert all(torch.equal(p, a) for p, a in zip(params, opt.anchor, strict=True))
    assert opt.flush() is None  # nothing in flight any more
    opt.close()
