"""Hostile frames of every kind against decode and a real transport (scripts/fuzz.py builds
them; `make fuzz` runs 10^5)."""

from __future__ import annotations

import importlib.util

from .conftest import REPO

spec = importlib.util.spec_from_file_location("fuzz", REPO / "scripts" / "fuzz.py")
fuzz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fuzz)


def test_decode_raises_only_wire_errors_on_hostile_frames():
    outcomes = fuzz.decode_only(30_000, seed=11)
    assert not {k: n for k, n in outcomes.items() if k.startswith("CRASH")}
    assert outcomes.get("accepted", 0) > 1000  # mutations that keep the wire valid reach the meta checks


def test_a_flooded_node_still_serves_a_real_peer_and_accounts_for_every_frame():
    report = fuzz.flood(20_000, seed=12)
    assert report["answered_after"] and report["io_thread_alive"]
    held, _ = report["held"]
    assert sum(report["dropped"].values()) + held == 20_000  # nothing vanished unaccounted
    for reason in ("BadMeta", "MalformedHeader", "TruncatedMessage", "BadSignature", "UnknownKind"):
        assert report["dropped"].get(reason, 0) > 0, reason
    assert report["log_bytes"] < 20_000  # rate-limited: a line per reason, not per frame
