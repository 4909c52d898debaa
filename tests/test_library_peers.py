"""Several library peers in one process: real hivemind DHTs and ZeroMQ sockets, one thread
per peer, each running its own loop."""

from __future__ import annotations

import threading
import time

import torch

import loco
from loco.node.config import CollectiveConfig


def _loop(swarm: loco.Swarm, steps: int, until: threading.Event | None, pause_at: int | None, reports: list,
          events: list, errors: list) -> None:
    """Train ``steps`` steps (and on, until ``until`` is set), stalling once at ``pause_at``."""
    torch.manual_seed(0)  # both replicas start from the same weights
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(len(swarm.id))
    timeouts = CollectiveConfig(matchmaking_timeout_s=2.0, join_timeout_s=20.0, allreduce_timeout_s=20.0,
                                decision_timeout_s=20.0)
    try:
        with loco.StreamingDiLoCo(model, opt, swarm, inner_steps=4, fragments=2, timeouts=timeouts,
                                  wait_for_peers=1, on_event=lambda kind, f: events.append(kind)) as outer:
            step = 0
            while step < steps or (until is not None and not until.is_set()):
                if step == pause_at:  # stalled past the leader's matchmaking timeout
                    time.sleep(6.0)
                x = torch.randn(16, 8, generator=data)
                torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
                opt.step()
                opt.zero_grad()
                step += 1
                report = outer.step(final=step >= steps and (until is None or until.is_set()))
                if report is not None:
                    reports.append((report.round, report.status, report.group_size, report.weights_hash))
    except BaseException as exc:  # (reported by the test, not lost in the thread)
        errors.append(exc)


def test_a_streaming_replica_that_fell_behind_resyncs_and_averages_again():
    """A replica whose fragment sync came after the leader closed it adopts the leader's
    state, then takes part in the next syncs again (it once kept offering the hash of its
    state from before the resync, and was told to resync at every sync for good)."""
    with loco.Swarm(run_id="lag", node_id="a") as a, loco.Swarm(run_id="lag", node_id="b", join=a.join_token) as b:
        runs = {n: ([], [], []) for n in ("a", "b")}
        b_done = threading.Event()  # a trains on until b has finished (and serves its state)

        def run_b() -> None:
            try:
                _loop(b, 60, None, 14, *runs["b"])
            finally:
                b_done.set()

        threads = [threading.Thread(target=_loop, args=(a, 60, b_done, None, *runs["a"])),
                   threading.Thread(target=run_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not any(t.is_alive() for t in threads), "a loop is still running after 240 s"
        for _, _, errors in runs.values():
            assert not errors, errors
        (ra, _, _), (rb, events_b, _) = runs["a"], runs["b"]
    assert "resync" in events_b, (events_b, rb)  # it did fall behind
    hashes_a = {rnd: h for rnd, status, group, h in ra if status == "ok" and group == 2}
    # together again: the last five rounds (the very last ends mid-round for the other) averaged
    together = [rnd for rnd, status, group, h in rb[-6:-1] if status == "ok" and group == 2 and hashes_a.get(rnd) == h]
    assert len(together) >= 3, (ra, rb)
