"""The library API from users' own loops: real processes that import only ``loco`` (the
examples, and the loops under tests/loops), joining real swarms on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from tests.conftest import FAST, group_members, read_records, wait_until

pytestmark = pytest.mark.swarm

PLAIN = "examples/plain_loop.py"
LOGGED = ("-m", "tests.loops.logged", PLAIN)  # the example, with loco's log lines in its log
ONE_THREAD = ["--threads", "1"]  # several processes share the test machine's cores


def _join_address(procs, name: str) -> str:
    found = wait_until(lambda: re.search(r"join with: (\S+)", procs.log(name)), 180, f"{name}'s address")
    return found.group(1)


def _finish(proc: subprocess.Popen, procs, name: str, timeout_s: float = 240) -> None:
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} did not finish in {timeout_s}s:\n{procs.log(name)[-3000:]}") from None
    assert code == 0, f"{name} exited {code}:\n{procs.log(name)[-3000:]}"


def _agreeing_rounds(a: list[dict], b: list[dict]) -> list[int]:
    """Rounds both processes finished ok together; fails if their weights differ in one.
    Each one's last round is left out: it ends at that process's last step (mid-round for
    the others) and lands what was in flight (CO2's reduce, Streaming's fragment)."""
    a, b = a[:-1], b[:-1]
    ok_b = {r["round"]: r for r in b if r["status"] == "ok" and r["group_size"] >= 2}
    together = [r["round"] for r in a if r["status"] == "ok" and r["group_size"] >= 2 and r["round"] in ok_b]
    for rnd in together:
        ra = next(r for r in a if r["round"] == rnd)
        assert ra["weights_hash"] == ok_b[rnd]["weights_hash"], f"round {rnd}: replicas differ"
    return together


@pytest.mark.parametrize("algorithm", ["diloco", "streaming_diloco", "noloco", "co2", "ddp"])
def test_a_plain_loop_trains_with_each_algorithm_a_late_joiner_starts_from_the_swarm_and_its_kill_stops_no_one(
        procs, tmp_path, algorithm):
    done = tmp_path / "done"  # a and b train until the late joiner is dead and they went on
    # (DDP averages every step: shorter rounds keep it quick)
    inner = "5" if algorithm == "ddp" else "10"
    common = ["--algorithm", algorithm, "--inner-steps", inner]
    reports = {n: tmp_path / f"{n}.jsonl" for n in ("a", "b", "c")}
    # (--steps 0: a and b train until the test is done with them, however long that takes)
    a = procs.python(*LOGGED, *ONE_THREAD, *common, "--steps", "0", "--until", str(done), "--peers", "1", "--seed", "1",
                     "--report", str(reports["a"]), log="a")
    addr = _join_address(procs, "a")
    b = procs.python(*LOGGED, *ONE_THREAD, *common, "--steps", "0", "--until", str(done), "--join", addr, "--seed", "2",
                     "--report", str(reports["b"]), log="b")
    c = procs.staged(*LOGGED, *ONE_THREAD, *common, "--steps", "400", "--join", addr, "--seed", "3",
                     "--report", str(reports["c"]), log="c")
    # the late joiner starts once the swarm is a few rounds in (NoLoCo adopts a peer's state
    # only when it is more than two rounds behind)
    wait_until(lambda: len(read_records(reports["a"])) >= 4, 180, "a's fourth round")
    c = c.go()
    wait_until(lambda: len(read_records(reports["c"])) >= 4, 240, "c's fourth round")
    # then it dies mid-round (the kill of its process alone: its reaper ends its DHT and p2pd)
    os.kill(c.pid, signal.SIGKILL)
    c.wait(timeout=30)
    wait_until(lambda: group_members(c.pid) == [], 60, "c's DHT process, p2pd and reaper to end")
    killed_at = {n: len(read_records(reports[n])) for n in ("a", "b")}
    wait_until(lambda: all(len(read_records(reports[n])) >= killed_at[n] + 4 for n in ("a", "b")), 240,
               "a and b to train four rounds past the kill")
    done.touch()
    _finish(a, procs, "a")
    _finish(b, procs, "b")
    ra, rb, rc = (read_records(reports[n]) for n in ("a", "b", "c"))
    assert ra[-1]["val_loss"] < 0.85 * ra[0]["val_loss"], ra
    assert rb[-1]["val_loss"] < 0.85 * rb[0]["val_loss"], rb
    # the late joiner took the swarm's round (and state) instead of starting at round 0
    assert rc[0]["round"] >= 3, rc
    assert rc[0]["val_loss"] < 0.95 * ra[0]["val_loss"], (rc[0], ra[0])
    after_a, after_b = ra[killed_at["a"]:], rb[killed_at["b"]:]
    if algorithm == "noloco":  # replicas differ by design; they still pair up, before and after
        assert any(r["group_size"] >= 2 for r in ra[:killed_at["a"]]), ra
        assert any(r["group_size"] == 2 for r in after_a), after_a
    else:
        assert len(_agreeing_rounds(ra, rb)) >= 3, (ra, rb)
        # the joiner averaged with the swarm (a Streaming joiner once resynced at every sync
        # for good, training alone), and with the same weights as each of them
        assert _agreeing_rounds(ra, rc) + _agreeing_rounds(rb, rc), (ra, rb, rc)
        # and the two that are left average on, together (the round c died in may hold its part)
        together = _agreeing_rounds(after_a, after_b)
        assert together and [r for r in after_a if r["round"] == together[-1]][0]["group_size"] == 2, (after_a, after_b)


def test_a_killed_loop_restarted_from_its_checkpoint_resumes_and_rejoins(procs, tmp_path):
    done, ckpt = tmp_path / "done", tmp_path / "b.ckpt"
    reports = {n: tmp_path / f"{n}.jsonl" for n in ("a", "b", "b2")}
    common = ["--inner-steps", "10", "--steps", "100", "--until", str(done)]
    a = procs.python(PLAIN, *ONE_THREAD, *common, "--peers", "1", "--report", str(reports["a"]), log="a")
    addr = _join_address(procs, "a")
    b = procs.python(PLAIN, *ONE_THREAD, *common, "--join", addr, "--seed", "2", "--checkpoint", str(ckpt),
                     "--report", str(reports["b"]), log="b")
    # (--steps counts from the checkpoint's step: b2 trains until it has averaged 3 rounds
    # with a; before those it may catch up, or skip a round the swarm had already closed)
    b2 = procs.staged(PLAIN, *ONE_THREAD, "--inner-steps", "10", "--steps", "0", "--until", str(tmp_path / "done2"),
                      "--join", addr, "--seed", "2", "--checkpoint", str(ckpt), "--report", str(reports["b2"]),
                      log="b2")
    wait_until(lambda: len(read_records(reports["b"])) >= 2, 180, "b's second round")
    os.killpg(b.pid, signal.SIGKILL)
    b.wait(timeout=30)
    saved_round = len(read_records(reports["b"]))  # at least the rounds it reported were saved
    b2 = b2.go()
    wait_until(lambda: sum(r["status"] == "ok" and r["group_size"] >= 2 for r in read_records(reports["b2"])) >= 3,
               240, "b2's third round averaged with a")
    (tmp_path / "done2").touch()
    _finish(b2, procs, "b2")
    done.touch()
    _finish(a, procs, "a")
    ra, rb2 = read_records(reports["a"]), read_records(reports["b2"])
    # resumed past its checkpoint (never from round 0), then back in step with the swarm
    assert rb2[0]["round"] >= saved_round, (saved_round, rb2)
    assert len(_agreeing_rounds(ra, rb2)) >= 2, (ra, rb2)


def test_the_library_and_the_daemon_give_the_same_weights(procs, tmp_path):
    sets = [*FAST, "optim.inner_steps=6", "train.rounds=2"]
    daemon = procs.loco("node", "start", "--out", str(tmp_path / "run"), "--node-id", "twin",
                        *[a for s in sets for a in ("--set", s)], "--set", "swarm.run_id='twin-daemon'", log="daemon")
    _finish(daemon, procs, "daemon")
    records = [r for r in read_records(tmp_path / "run" / "metrics" / "twin.jsonl") if r["event"] == "outer"]
    library = procs.python("-m", "tests.loops.daemon_twin", "--node-id", "twin", "--rounds", "2",
                           *[a for s in sets for a in ("--set", s)], log="library")
    _finish(library, procs, "library")
    hashes = json.loads(procs.log("library").strip().splitlines()[-1])["hashes"]
    assert [r["weights_hash"] for r in records] == hashes


def test_close_after_a_user_exception_leaves_nothing_behind_and_the_peer_trains_on(procs, tmp_path):
    report = tmp_path / "peer.jsonl"
    done = tmp_path / "done"
    peer = procs.python(PLAIN, *ONE_THREAD, "--inner-steps", "10", "--steps", "200", "--until", str(done), "--report", str(report),
                        log="peer")
    addr = _join_address(procs, "peer")
    user = procs.python("-m", "tests.loops.close_on_error", "--join", addr, "--fail-at", "25", log="user")
    _finish(user, procs, "user")
    left = json.loads(procs.log("user").strip().splitlines()[-1])
    assert left["failed"] and left["rounds"] >= 2, left
    assert left["sockets"] == [], left
    # no TCP socket (ZeroMQ, DHT), DHT process, p2pd, reaper or loco thread is left. What
    # stays is process-wide and not loco's: torch's shared-memory manager and two idle
    # threads (hivemind's MPFuture backend, multiprocessing's fd sharer), started once per
    # process by the first DHT handle, with their local unix sockets
    assert [c for c in left["children"] if not c.endswith("torch_shm_manager")] == [], left
    assert [t for t in left["threads"] if "mpfuture" not in t and "_serve" not in t] == [], left
    # the peer trains on alone once the user has closed: every round it runs from here is ok.
    # (While the user was joining, a few of the peer's rounds may skip: the peer runs a round
    # every few milliseconds and the user chases it, resyncing; that is not what this tests.)
    gone = len(read_records(report)) + 1  # the round in flight when the user closed may have waited for it
    wait_until(lambda: len(read_records(report)) >= gone + 20, 120, "20 more rounds of the peer")
    done.touch()
    _finish(peer, procs, "peer")
    rounds = read_records(report)
    assert rounds[-1]["val_loss"] < 0.85 * rounds[0]["val_loss"], rounds
    assert all(r["status"] == "ok" and r["group_size"] == 1 for r in rounds[gone:]), rounds[gone:]


def test_the_huggingface_example_trains_and_its_members_agree(procs, tmp_path):
    pytest.importorskip("transformers")
    reports = {n: tmp_path / f"{n}.jsonl" for n in ("a", "b")}
    args = ["examples/hf_causal_lm.py", *ONE_THREAD, "--steps", "60", "--inner-steps", "15"]
    a = procs.python(*args, "--peers", "1", "--seed", "1", "--report", str(reports["a"]), log="hf-a")
    b = procs.python(*args, "--join", _join_address(procs, "hf-a"), "--seed", "2", "--report", str(reports["b"]),
                     log="hf-b")
    _finish(a, procs, "hf-a", 400)
    _finish(b, procs, "hf-b", 400)
    ra, rb = read_records(reports["a"]), read_records(reports["b"])
    assert len(_agreeing_rounds(ra, rb)) >= 3, (ra, rb)
    assert ra[-1]["val_loss"] < ra[0]["val_loss"] - 0.3, ra
    # int8 pseudo-gradients: each member of two sends about one copy of the model, at a
    # byte per value (plus scales), instead of four
    together = ra[1]
    assert 0.9 * together["params"] < together["round_bytes"] < 0.35 * 4 * together["params"], together
