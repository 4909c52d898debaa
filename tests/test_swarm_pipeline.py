"""SkipPipe on real processes: 3 stages x 2 replicas of the built-in GPT on 127.0.0.1, a real
DHT, activations and gradients over ZeroMQ. Behaviour, not speed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import REPO, wait_until
from tests.test_swarm import _node_args, _outer, _ready, _sets, _staged_node, _start_node, _wait_exit
from tests.test_swarm_algorithms import _records

pytestmark = pytest.mark.swarm

PIPE = ("model.n_layer=3", "pipeline.stages=3", "pipeline.skip=0.33", "pipeline.microbatches=4",
        "pipeline.eval_every=5", "pipeline.iteration_timeout_s=15")


def _check_paths(records: list[dict]) -> Counter:
    """Every path a stage-0 node started obeys the skip ratio; returns visits per stage."""
    visits: Counter = Counter()
    for r in records:
        for stages in r.get("paths", []):
            assert stages[0] == 0 and stages[-1] == 0, stages
            middle = stages[1:-1]
            assert len(middle) == 1 and middle[0] in (1, 2), stages  # 2 of 3 stages: skip 0.33
            visits.update(middle)
    return visits


def test_pipeline_of_three_stages_and_two_replicas_trains_with_skips(procs, tmp_path):
    out = tmp_path / "run"
    # stages placed from the measured speeds and links (auto_assign), two replicas each. The
    # norm outlier rule is off (its own tests: test_pipeline_replicas.py): with two replicas
    # it leaves out the larger of two honest gradients, and a replica's gradient over its
    # share of 4 microbatches spiked 13x its twin's in one suite run (norms 0.55 and 7.23 at
    # iteration 17; iteration 12 in earlier runs), so the replicas did not average that once
    p = procs.loco("swarm", "--nodes", "6", "--out", str(out),
                   *_sets(*PIPE, "train.rounds=20", "pipeline.auto_assign=true", "collective.max_norm_ratio=0"),
                   log="swarm")
    assert _wait_exit(p, 420, "swarm", procs) == 0, procs.log("swarm")[-3000:]
    nodes = [f"node{i}" for i in range(6)]
    recs = {n: _outer(out, n) for n in nodes}
    stage = {n: recs[n][0]["stage"] for n in nodes}
    replicas = {s: sorted(n for n in nodes if stage[n] == s) for s in range(3)}
    assert all(len(r) == 2 for r in replicas.values()), stage
    for n in nodes:
        assert [r["round"] for r in recs[n]] == list(range(20)), n
        assert all(r["status"] == "ok" and r["stage"] == stage[n] for r in recs[n]), recs[n]
    first = next(r["val_loss"] for n in replicas[0] for r in recs[n][:1] if math.isfinite(r["val_loss"]))
    last = recs[nodes[0]][-1]["val_loss"]
    assert last < first - 0.3, (first, last)
    assert {recs[n][-1]["val_loss"] for n in nodes} == {last}  # the leader's final validation reaches all
    visits = _check_paths([r for n in replicas[0] for r in recs[n]])
    assert sum(visits.values()) == 20 * 4  # every microbatch of every iteration
    assert visits[1] == visits[2]  # stage load balanced
    # the nodes that ran a microbatch's backward pass: stage 1 and 2 visits add up
    ran = Counter()
    for n in nodes:
        ran[stage[n]] += sum(len(r["visited"]) for r in recs[n])
    assert ran[1] == visits[1] and ran[2] == visits[2] and ran[0] == 80
    # each stage's replicas average gradients every iteration: bit-identical weights
    for it in range(20):
        for s, (a, b) in replicas.items():
            ra, rb = recs[a][it], recs[b][it]
            assert ra["weights_hash"] == rb["weights_hash"] and ra["group_size"] == 2, (it, s)
    # saved every iteration (train.checkpoint_every = 1), the one before kept (keep_checkpoints = 1)
    assert all((out / "checkpoints" / f"{n}.safetensors.1").exists() for n in nodes)
    assert all(r["checkpoint_s"] > 0 for n in nodes for r in recs[n][:-1])
    # the checkpoints make the whole model again: its loss is the leader's final validation
    ev = subprocess.run([sys.executable, "-m", "loco.node.cli", "eval-skips", str(out)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    rows = json.loads((out / "skip_eval.json").read_text())
    assert rows[0]["skipped_stages"] == [] and rows[0]["val_loss"] == pytest.approx(last, abs=1e-4)
    assert [r["skipped_stages"] for r in rows[1:]] == [[1], [2]]
    # and `loco export` puts the stages together as one GPT-2 that transformers loads alone
    from loco.node.export import export_run
    from tests.test_swarm_models import _val_loss_of_export

    made = export_run(out, tmp_path / "model")
    assert made.kind == "gpt2" and made.node in [n for n in nodes if stage[n] == 0]
    assert _val_loss_of_export(tmp_path / "model", out) == pytest.approx(last, abs=1e-4)


def test_stage_replicas_kept_close_by_noloco_gossip(procs, tmp_path):
    out = tmp_path / "run"
    # 2 stages x 2 replicas; each stage's replicas train apart and gossip every 2 iterations,
    # int8-compressed (compression.codec); activations and gradients travel in bfloat16
    p = procs.loco("swarm", "--nodes", "4", "--out", str(out),
                   *_sets("model.n_layer=2", "pipeline.stages=2", "pipeline.skip=0.0", "pipeline.microbatches=4",
                          "pipeline.eval_every=4", "pipeline.sync='noloco'", "pipeline.sync_every=2",
                          "train.rounds=12", "compression.codec='int8'", "pipeline.wire_dtype='bfloat16'"),
                   log="swarm")
    assert _wait_exit(p, 420, "swarm", procs) == 0, procs.log("swarm")[-3000:]
    nodes = [f"node{i}" for i in range(4)]
    recs = {n: _outer(out, n) for n in nodes}
    for n in nodes:
        assert [r["round"] for r in recs[n]] == list(range(12)), n
        assert all(r["status"] == "ok" for r in recs[n]), recs[n]
        # the outer steps paired it with its stage's other replica
        assert [r["group_size"] for r in recs[n] if r["round"] % 2 == 1] == [2] * 6, recs[n]
        stop = _records(out, n, "stop")[-1]
        assert stop["sent_by_kind"].get("GOSSIP", 0) == 6 and "PART" not in stop["sent_by_kind"], stop
    # a gossip sends [φ, θ − φ] at about a byte per value (float32: eight bytes per value)
    from loco.node.checkpoint import load_checkpoint

    for n in nodes:
        values = sum(t.numel() for t in load_checkpoint(out / "checkpoints" / f"{n}.safetensors")["model"].values())
        sent = [r["sync_bytes"][0] for r in recs[n]]
        assert all(0 < b < 4 * values for b in sent[1::2]) and sent[0::2] == [0] * 6, (n, values, sent)
    # a stage-1 node sends one FWD and one BWD per microbatch it ran (no validation in these
    # iterations; the last one ends with the final validation): each holds [8, 64, 64]
    # values at two bytes (bfloat16), plus the header (the scheduler may route every
    # microbatch through one of them)
    hops = [(r["round_bytes"] - r["sync_bytes"][0]) / (2 * len(r["visited"])) for n in ("node1", "node3")
            for r in recs[n] if r["round"] % 4 and r["round"] < 11 and r["visited"]]
    assert hops and all(8 * 64 * 64 * 2 <= b < 8 * 64 * 64 * 2 + 4096 for b in hops), sorted(set(hops))
    # replicas train apart between gossips (NoLoCo does not make them identical)
    assert any(recs["node0"][i]["weights_hash"] != recs["node2"][i]["weights_hash"] for i in range(12))
    first = next(r["val_loss"] for r in recs["node0"] if math.isfinite(r["val_loss"]))
    assert recs["node0"][-1]["val_loss"] < first - 0.2


def _routes(out, rounds) -> dict[int, list[list[str]]]:
    """The paths (as nodes) the stage-0 nodes started, per iteration."""
    by_round: dict[int, list[list[str]]] = {}
    for n in ("node0", "node3"):
        for r in _outer(out, n):
            if r["round"] in rounds:
                by_round.setdefault(r["round"], []).extend(r.get("routes", []))
    return by_round


def test_pipeline_survives_a_killed_replica_its_restart_and_a_killed_leader(procs, tmp_path):
    out = tmp_path / "run"
    # every path visits every stage, in random valid orders (swaps included). No budget: the
    # test stops the nodes (SIGTERM) once each fault has played out, however long the
    # restarted node takes for its imports, DHT, link probes and hand-off on a busy machine
    extra = (*PIPE, "train.rounds=0", "swarm.wait_for_peers=5", "pipeline.skip=0.0", "pipeline.paths='random'")
    started = {"node0": _start_node(procs, out, "node0", *extra)}
    for i in range(1, 6):
        started[f"node{i}"] = _start_node(procs, out, f"node{i}", *extra, via_node0=True)
    peer = _ready(out, "node0")["join"]
    # the stage-1 replica killed below restarts (which one the paths use is known then)
    restarts = {n: _staged_node(procs, out, n, *extra, peer=peer) for n in ("node1", "node4")}

    def until(predicate, what: str) -> None:  # (a node that exits early fails the wait at once)
        def check():
            dead = {n: p.returncode for n, p in started.items() if p.poll() is not None}
            assert not dead, f"{dead} exited while waiting for {what}"
            return predicate()
        wait_until(check, 240, what)

    until(lambda: any(r["round"] >= 4 for r in _outer(out, "node0")), "node0 to reach iteration 4")
    # 1. kill the stage-1 replica the latest paths go through (the scheduler may use one)
    used = [n for o in ("node0", "node3") for r in _outer(out, o)[-2:] for path in r.get("routes", []) for n in path]
    victim = next(n for n in ("node1", "node4") if n in used)
    survivor = "node4" if victim == "node1" else "node1"
    proc = started.pop(victim)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = max(r["round"] for r in _outer(out, "node0"))

    def rerouted() -> bool:  # three iterations in a row without the victim, none lost
        recent = [r for r in _outer(out, "node0") if r["round"] > killed_at][-3:]
        return len(recent) == 3 and all(r["lost"] == 0 and victim not in sum(r.get("routes", []), []) for r in recent)

    until(rerouted, f"paths to route around {victim}")
    # 2. restart it under the same id (a new process, a new endpoint): it joins the running
    # pipeline with the stage state the survivor hands it
    started[victim] = restarts[victim].go()
    until(lambda: len(_records(out, victim, "join")) == 2 and len(_outer(out, victim)) >= killed_at + 6,
          f"{victim} to rejoin and train")
    # 3. kill the leader (node0, the smallest stage-0 id): node3 plans from then on
    proc = started.pop("node0")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    leader_killed_at = _outer(out, "node0")[-1]["round"] + 1
    until(lambda: len(_outer(out, "node3")) >= leader_killed_at + 8, "node3 to lead eight iterations")
    for p in started.values():  # 4. stop: each node ends the iteration it is in, saves and leaves
        os.kill(p.pid, signal.SIGTERM)
    for n, p in started.items():
        assert _wait_exit(p, 180, n, procs) == 0, procs.log(n)[-3000:]
    lead = _outer(out, "node3")
    rounds = len(lead)
    assert [r["round"] for r in lead] == list(range(rounds))
    first = next(r["val_loss"] for r in lead if math.isfinite(r["val_loss"]))
    assert lead[-1]["val_loss"] < first - 0.3
    assert all(_outer(out, n)[-1]["round"] >= rounds - 2 for n in started)  # (stopped within an iteration)
    # after the takeover, node3 starts every microbatch and none is lost (the last
    # iterations may be cut short by the stop)
    tail = [r for r in lead if leader_killed_at + 2 <= r["round"] < rounds - 2]
    assert len(tail) >= 3 and all(r["lost"] == 0 and len(r["routes"]) == 4 for r in tail), tail

    # the restarted replica signs with the key its peers bound its id to: all of them answer
    # its link probes (with a fresh key they would ignore it as an impersonator for a minute)
    assert len(_records(out, victim, "start")[-1]["links"]) == 5, _records(out, victim, "start")
    # the replica's absence: stage 1 ran on the survivor alone
    joins = _records(out, victim, "join")
    assert joins[0]["source"] == "seed" and joins[0]["round"] == 0  # the first run, at the start
    joined = joins[-1]
    assert joined["source"] == f"replica {survivor}", joins
    j = joined["round"]
    assert killed_at < j < leader_killed_at, (killed_at, j, leader_killed_at)
    away = _routes(out, range(killed_at + 1, j))
    gone = [r for r in sorted(away) if all(victim not in path for path in away[r])]
    assert gone and all(victim not in path for r in away if r > gone[0] for path in away[r])
    assert all(survivor in path for r in gone for path in away[r])
    assert sum(len(r["visited"]) for r in _outer(out, survivor) if killed_at < r["round"] < j) > 0
    # its return: it trains every iteration from then on, bit-identical to the survivor from
    # its first one (a replica that started from the seed would not be), and paths use it
    back = [r for r in _outer(out, victim) if r["round"] >= j]
    assert [r["round"] for r in back] == list(range(j, j + len(back))) and back[-1]["round"] >= rounds - 2
    by_round = {r["round"]: r for r in _outer(out, survivor)}
    assert joined["weights_hash"] == by_round[j - 1]["weights_hash"]
    for r in back:
        if r["round"] < rounds - 2:  # (the last ones may be cut short by the stop)
            assert r["status"] == "ok" and r["weights_hash"] == by_round[r["round"]]["weights_hash"], r["round"]
    assert any(victim in path for paths in _routes(out, range(j, rounds)).values() for path in paths)
    assert all(r["lost"] == 0 for n in ("node0", "node3") for r in _outer(out, n) if j <= r["round"] < leader_killed_at - 1)
    orders = {tuple(p) for n in ("node0", "node3") for r in _outer(out, n) for p in r.get("paths", [])}
    assert orders <= {(0, 1, 2, 0), (0, 2, 1, 0)} and (0, 2, 1, 0) in orders  # a swap ran, in path order


def test_a_sole_stage_replica_killed_and_restarted_resumes_from_its_own_checkpoint(procs, tmp_path):
    """Stage 1 has one replica: SIGKILLed mid-training, its stage has no live replica to hand
    its state over, so the restart brings back what its background writer last completed
    (train.checkpoint_every = 1), not the seed's weights; the pipeline then trains on."""
    out = tmp_path / "run"
    extra = ("model.n_layer=2", "pipeline.stages=2", "pipeline.microbatches=2", "pipeline.iteration_timeout_s=15",
             "train.rounds=0", "train.checkpoint_every=1", "swarm.wait_for_peers=1")
    started = {"node0": _start_node(procs, out, "node0", *extra)}
    started["node1"] = _start_node(procs, out, "node1", *extra, via_node0=True)
    restart = _staged_node(procs, out, "node1", *extra, peer=_ready(out, "node0")["join"])
    wait_until(lambda: len(_outer(out, "node1")) >= 4, 300, "node1's fourth iteration")
    os.kill(started["node1"].pid, signal.SIGKILL)
    started["node1"].wait(timeout=30)
    trained = _outer(out, "node1")
    started["node1"] = restart.go()
    # (six: the stop may cut short the iterations it lands in)
    wait_until(lambda: len(_records(out, "node1", "join")) == 2 and len(_outer(out, "node1")) >= len(trained) + 6,
               300, "node1 to come back and train six iterations")
    for p in started.values():
        os.kill(p.pid, signal.SIGTERM)
    for n, p in started.items():
        assert _wait_exit(p, 180, n, procs) == 0, procs.log(n)[-3000:]
    first, back = _records(out, "node1", "join")
    assert first["source"] == "seed" and back["source"] == "checkpoint node1.safetensors", back
    # it came back with the stage state after one of the iterations it trained (the last, or
    # the one before when the kill tore the newest write), not the seed's
    assert back["weights_hash"] in {r["weights_hash"] for r in trained[-2:]}, (back, trained[-2:])
    assert back["weights_hash"] != first["weights_hash"]
    after = _outer(out, "node1")[len(trained):]
    assert len(after) >= 3 and all(r["status"] == "ok" for r in after[:3]), after


def test_a_joiner_whose_hand_off_source_dies_gets_the_state_from_another_replica(procs, tmp_path):
    """node3 joins stage 1, whose replicas are node1 and node2; the leader names node1 (the
    smaller id) to hand it the stage's state, and node1 dies as it would send it. node3 asks
    to be admitted again instead of exiting, and the next plan names node2: node3 takes
    part from then on with node2's state."""
    out = tmp_path / "run"
    extra = ("model.n_layer=2", "pipeline.stages=2", "pipeline.assignment=[0, 1, 1, 1]", "pipeline.microbatches=2",
             "pipeline.iteration_timeout_s=15", "train.rounds=0", "swarm.wait_for_peers=2")
    started = {"node0": _start_node(procs, out, "node0", *extra)}
    node1 = procs.python("tests/loops/faulty_node.py", "die_sending:PP_STATE",
                         *_node_args(out, "node1", *extra, via_node0=True), log="node1")
    started["node2"] = _start_node(procs, out, "node2", *extra, via_node0=True)
    joiner = _staged_node(procs, out, "node3", *extra, peer=_ready(out, "node0")["join"])
    wait_until(lambda: len(_outer(out, "node0")) >= 3, 300, "node0's third iteration")
    started["node3"] = joiner.go()
    assert node1.wait(timeout=300) == 137, procs.log("node1")[-3000:]  # it died handing over
    # (six: the stop may cut short the iterations it lands in, and these take a fraction of a second)
    wait_until(lambda: len(_outer(out, "node3")) >= 6, 300, "node3 to join and train six iterations")
    for p in started.values():
        os.kill(p.pid, signal.SIGTERM)
    for n, p in started.items():
        assert _wait_exit(p, 180, n, procs) == 0, procs.log(n)[-3000:]
    (joined,) = _records(out, "node3", "join")
    assert joined["source"] == "replica node2", joined
    j = joined["round"]
    by_round = {r["round"]: r for r in _outer(out, "node2")}
    assert joined["weights_hash"] == by_round[j - 1]["weights_hash"]
    back = _outer(out, "node3")
    assert [r["round"] for r in back[:3]] == [j, j + 1, j + 2], back
    assert all(r["status"] == "ok" and r["group_size"] == 2 for r in back[:3]), [(r["status"], r["reason"]) for r in back]
    assert "asking to join again" in procs.log("node3")


def test_a_huggingface_gpt2_trains_as_a_pipeline(procs, tmp_path):
    """Any model that declares its stages can be pipelined: a HuggingFace GPT-2 built by
    model.factory, cut by pipeline.split = loco.hf:gpt2_parts; 2 stages, stage 0 on two
    replicas that average every iteration (so they stay identical)."""
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    gpt2 = ("{config={model_type='gpt2', n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=256, "
            "resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0}}")
    keys = [f for f in _sets("pipeline.stages=2")[1::2] if not f.startswith("model.")]  # (the built-in GPT's shape)
    keys += ["model.factory='loco.hf:causal_lm'", f"model.kwargs={gpt2}", "model.block_size=64",
             "pipeline.split='loco.hf:gpt2_parts'", "pipeline.microbatches=4", "pipeline.eval_every=3",
             "train.rounds=10", "optim.inner_lr=0.003"]
    p = procs.loco("swarm", "--nodes", "3", "--out", str(out), *[a for k in keys for a in ("--set", k)], log="swarm")
    assert _wait_exit(p, 420, "swarm", procs) == 0, procs.log("swarm")[-3000:]
    recs = {n: _outer(out, n) for n in ("node0", "node1", "node2")}
    for n, rs in recs.items():
        assert [r["round"] for r in rs] == list(range(10)) and all(r["status"] == "ok" for r in rs), (n, rs)
    assert [r["weights_hash"] for r in recs["node0"]] == [r["weights_hash"] for r in recs["node2"]]
    assert all(r["group_size"] == 2 for r in recs["node0"])
    first = next(r["val_loss"] for r in recs["node0"] if math.isfinite(r["val_loss"]))
    assert recs["node0"][-1]["val_loss"] < first - 0.2, [r["val_loss"] for r in recs["node0"]]
