"""L-GreCo: the dynamic program against brute force, plans on real layer updates, and
every peer of a real collective holding the same plan."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from loco.node.config import ModelConfig
from loco.node.model import build_model, unique_parameters
from loco.protocols.codecs import Compressor
from loco.protocols.codecs.lgreco import candidate_levels, make_plan, solve
from loco.protocols.collective import CollectiveTimeouts, GroupAllReduce
from loco.protocols.membership import PeerInfo
from loco.protocols.transport import Transport


def test_dp_matches_brute_force_within_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(30):
        layers, levels = int(rng.integers(1, 6)), int(rng.integers(2, 4))
        # more bytes buy less error, as with real codecs
        sizes = np.sort(rng.integers(10, 1000, size=(layers, levels)), axis=1)
        errors = np.sort(rng.random((layers, levels)) * 10, axis=1)[:, ::-1].copy()
        base = int(rng.integers(0, levels))
        picks, err, nbytes = solve(errors, sizes, base, bins=2000)
        budget = errors[:, base].sum()
        assert err <= budget * (1 + 1e-12) and nbytes <= sizes[:, base].sum()
        best = min(sum(sizes[i, c] for i, c in enumerate(combo))
                   for combo in itertools.product(range(levels), repeat=layers)
                   if sum(errors[i, c] for i, c in enumerate(combo)) <= budget)
        # discretization costs at most a little: here within 10% of the true optimum
        assert nbytes <= best * 1.1 + 1


def _real_updates() -> list[torch.Tensor]:
    """A pseudo-gradient φ − θ of the built-in GPT after 20 inner AdamW steps."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, n_embd=64, n_head=4, block_size=32))
    params = unique_parameters(model)
    start = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(1)
    text = torch.randint(0, 256, (64, 33), generator=g)
    for i in range(20):
        x, y = text[i % 4 * 16:(i % 4 + 1) * 16, :-1], text[i % 4 * 16:(i % 4 + 1) * 16, 1:]
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [(s - p.detach()) for s, p in zip(start, params, strict=True)]


@pytest.mark.parametrize("family,base", [("int", 4), ("topk", 0.05), ("powersgd", 4)])
def test_plan_on_real_updates_never_costs_more_error_or_bytes(family, base):
    updates = _real_updates()
    plan = make_plan(family, base, updates, {"block": 256, "density": 0.05, "rank": 4})
    assert plan.error <= plan.uniform_error * (1 + 1e-12)
    assert plan.bytes <= plan.uniform_bytes
    assert set(plan.levels.values()) <= set(candidate_levels(family, base))
    if family != "int":
        # layers differ in how well they sparsify / how low-rank they are: bytes to save.
        # (Max-abs quantization has about the same relative error on every layer, so on
        # this model the best int plan is the uniform one; the guarantees above still hold.)
        assert plan.bytes < 0.9 * plan.uniform_bytes


def test_every_peer_of_a_collective_computes_the_same_plan():
    updates = _real_updates()
    n = 3
    transports = [Transport(f"q{i}") for i in range(n)]
    try:
        def view(me):
            return lambda: [PeerInfo(t.node_id, t.endpoint, 0) for t in transports if t.node_id != me]

        timeouts = CollectiveTimeouts(matchmaking_s=10, join_s=20, allreduce_s=10, decision_s=10)
        coll = [GroupAllReduce(t, view(t.node_id), timeouts, Compressor("int4")) for t in transports]
        plans, results = {}, {}

        def peer(i):
            mine = [u * (1 + 0.1 * i) for u in updates]  # different inputs per peer
            res = coll[i].all_reduce(0, mine)
            results[i] = [t.clone() for t in res.tensors]
            plans[i] = make_plan("int", 4, res.tensors, {"block": 256}).levels

        threads = [threading.Thread(target=peer, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(plans) == n
        for i in range(1, n):
            assert all(torch.equal(a, b) for a, b in zip(results[0], results[i], strict=True))
            assert plans[i] == plans[0]
        want = [u * 1.1 for u in updates]  # the mean of the three inputs, within int4 error
        err = sum(float((a - b).norm()) for a, b in zip(results[0], want, strict=True))
        assert err < 0.2 * sum(float(b.norm()) for b in want)
    finally:
        for t in transports:
            t.close()
