"""Compression in real swarms (DiLoCo): training stays close to the uncompressed run,
bytes at the socket drop, replicas stay bit-identical, L-GreCo plans agree."""

from __future__ import annotations

import pytest

from tests.test_swarm import _hashes_by_round, _outer
from tests.test_swarm_algorithms import _records, _swarm

pytestmark = pytest.mark.swarm

NODES = ["node0", "node1"]  # two: each node process costs ~7 s of CPU to start (torch, hivemind, a DHT)


def _final(out) -> tuple[float, int]:
    vals = [_outer(out, n)[-1]["val_loss"] for n in NODES]
    sent = sum(_records(out, n, "stop")[-1]["bytes_sent"] for n in NODES)
    return sum(vals) / len(vals), sent


def test_diloco_with_int4_and_topk_trains_close_to_uncompressed_and_lgreco_plans_agree(procs, tmp_path):
    runs = {
        "none": [],
        "int4": ["compression.codec='int4'", "compression.block_size=128"],
        # with L-GreCo planning per-layer densities every round after the first
        "topk": ["compression.codec='topk'", "compression.density=0.05", "compression.lgreco.enabled=true",
                 "compression.lgreco.every_rounds=1", "compression.lgreco.warmup_rounds=1"],
    }
    results = {}
    for name, extra in runs.items():
        out = tmp_path / name
        _swarm(procs, out, len(NODES), "train.rounds=4", *extra)
        results[name] = _final(out)
        for n in NODES:
            assert all(r["status"] == "ok" for r in _outer(out, n))
            if name != "none":
                assert all(r["encode_s"] > 0 for r in _outer(out, n))
        for rnd, hashes in _hashes_by_round(out, NODES).items():  # compressed, still bit-identical
            assert len(set(hashes.values())) == 1, (name, rnd, hashes)
    (v_none, b_none), (v_int4, b_int4), (v_topk, b_topk) = results["none"], results["int4"], results["topk"]
    assert v_int4 <= v_none * 1.03, results
    assert v_topk <= v_none * 1.10, results
    assert b_int4 < 0.3 * b_none and b_topk < 0.3 * b_none, results
    plans: dict[int, set[str]] = {}
    for n in NODES:
        for r in _outer(tmp_path / "topk", n):
            if "lgreco" in r:
                p = r["lgreco"]
                assert p["error"] <= p["uniform_error"] * (1 + 1e-9) and p["bytes"] <= p["uniform_bytes"]
                plans.setdefault(r["round"], set()).add(str(p["levels"]))
    assert len(plans) >= 3
    assert all(len(v) == 1 for v in plans.values()), plans  # every node holds the same plan
