"""Nodes of several processes through the CLI (node.nproc_per_node): one node started by
torchrun, one by ``loco node start --nproc-per-node``, DDP inside over gloo, DiLoCo across;
real processes, a real DHT, real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.conftest import group_members, read_records, wait_until
from tests.test_swarm import _hashes_by_round, _outer, _ready, _sets, _wait_exit

pytestmark = pytest.mark.swarm

LOCO = str(Path(sys.executable).with_name("loco"))


def _records(out: Path, node: str, event: str) -> list[dict]:
    return [r for r in read_records(out / "metrics" / f"{node}.jsonl") if r["event"] == event]


def _ranks_of(launcher_pid: int) -> list[int]:
    """The rank processes a launcher started: the children of its fork server (the child of
    the launcher that runs multiprocessing's forkserver)."""
    parents, servers = {}, set()
    for pid in group_members(os.getpgid(launcher_pid)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if parents[pid] == launcher_pid and b"multiprocessing.forkserver" in cmd:
            servers.add(pid)
    return [pid for pid, parent in parents.items() if parent in servers]


def test_nodes_of_two_ranks_started_by_torchrun_and_by_the_cli_train_and_agree(procs, tmp_path):
    out = tmp_path / "run"
    common = ["node", "start", "--out", str(out), *_sets("train.rounds=4", "swarm.wait_for_peers=1")]
    a = procs.python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python", LOCO,
                     *common, "--node-id", "node0", log="node0")
    b = procs.loco(*common, "--node-id", "node1", "--nproc-per-node", "2", "--join-file",
                   str(out / "nodes" / "node0.json"), log="node1")
    for name, p in (("node0", a), ("node1", b)):
        assert _wait_exit(p, 300, name, procs) == 0, procs.log(name)[-3000:]
    for node in ("node0", "node1"):
        start, = _records(out, node, "start")
        assert start["processes"] == 2
        last = _outer(out, node)[-1]
        assert last["tokens"] == last["step"] * 2 * 8 * 64  # two ranks, each its own batch of 8 x 64
        assert last["val_loss"] < start["val_loss"]
    together = [hs for hs in _hashes_by_round(out, ["node0", "node1"]).values() if len(hs) == 2]
    assert len(together) >= 3 and all(len(set(hs.values())) == 1 for hs in together), together
    # the follower ranks ran every step with rank 0 and stopped with it
    assert "rank 1 of node node0: done at step 32, round 4" in procs.log("node0")
    assert "rank 1 of node node1: done at step 32, round 4" in procs.log("node1")


# (DiLoCo's split state is CO2's less the reduce in flight; DDP's resume from a sharded
# checkpoint is the graceful-restart test's below, and a killed rank takes a node out the
# same way whatever its algorithm)
@pytest.mark.parametrize("algorithm", ["co2", "streaming_diloco"])
def test_a_killed_rank_takes_its_node_out_the_other_trains_on_and_the_restarted_node_resumes(procs, tmp_path,
                                                                                           algorithm):
    """Both nodes FSDP2 inside, each rank keeping the outer state of its own half of the
    weights (and serving its half of the published state). Restarted, node1 loads its
    checkpoint (each rank its own half of the outer state) and adopts node0's state, which
    is ahead: fetched in parts from both of node0's ranks, put together, checked against
    node0's hash, and split again over node1's ranks. CO2: CO2 (gap-aware): the per-tensor statistics of its
    penalty, the same on every rank, travel with the state. node1 also applies the mean of
    the reduce node0 had in flight, served in parts by node0's ranks and split again over
    node1's (without it node1 would lack one update, and not agree with node0), unless that
    reduce failed at node0 too (node1 joined in the middle of it): then node0 applied nothing
    either. Streaming DiLoCo: every rank keeps its region of every fragment; the state is
    served and hashed fragment by fragment, as a one-process member orders it."""
    out = tmp_path / "run"
    common = ["node", "start", "--out", str(out), "--nproc-per-node", "2", "--set", "node.parallel='fsdp'",
              *_sets("train.rounds=0", "swarm.wait_for_peers=1", f"optim.algorithm='{algorithm}'")]
    if algorithm == "co2":  # (its statistics: whole on every rank, served by the leader after the regions)
        common += ["--set", "optim.co2.staleness='gap_aware'"]
    procs.loco(*common, "--node-id", "node0", log="node0")
    _ready(out, "node0")
    join = ["--join-file", str(out / "nodes" / "node0.json")]
    b = procs.loco(*common, "--node-id", "node1", *join, log="node1")
    wait_until(lambda: len(_outer(out, "node1")) >= 3, 240, "node1's third round")
    follower = [pid for pid in _ranks_of(b.pid) if pid != _ready(out, "node1")["pid"]]
    assert len(follower) == 1, follower
    os.kill(follower[0], signal.SIGKILL)
    assert b.wait(timeout=120) != 0  # its launcher ends rank 0, which leaves the swarm
    wait_until(lambda: group_members(b.pid) == [], 60, "node1's processes (its DHT, its reaper) to end")
    stopped_at = len(_outer(out, "node1"))
    seen = len(_outer(out, "node0"))
    wait_until(lambda: [r for r in _outer(out, "node0")[seen:] if r["status"] == "ok" and r["group_size"] == 1],
               240, "an ok round of node0 alone")
    # node1 again, the same command: it resumes from its checkpoint and trains with node0
    procs.loco(*common, "--node-id", "node1", *join, log="node1-again")
    wait_until(lambda: len(_records(out, "node1", "start")) == 2, 180, "node1's second start")
    again = _records(out, "node1", "start")[1]
    assert again["resumed"] and again["processes"] == 2, again
    # (node0 trained on alone meanwhile: node1 is behind, and adopts its state when it joins)
    adopted = wait_until(lambda: _records(out, "node1", "resync"), 240, "node1 adopting node0's state")
    assert adopted[0]["from_round"] < adopted[0]["round"], adopted
    wait_until(lambda: any(len(hs) == 2 for r, hs in _hashes_by_round(out, ["node0", "node1"]).items()
                           if r >= stopped_at), 240, "a round node0 and the restarted node1 average together")
    together = [hs for r, hs in _hashes_by_round(out, ["node0", "node1"]).items() if r >= stopped_at and len(hs) == 2]
    assert all(len(set(hs.values())) == 1 for hs in together), together
    if algorithm == "co2":  # the mean it missed: fetched whole from node0's parts (or failed there too)
        log = procs.log("node1-again")
        assert "no usable CO2 reduce" not in log and re.search(r"fetched the mean of CO2 reduce|failed at .* too", log)


def test_a_sharded_ddp_node_and_one_process_nodes_train_together_resume_and_adopt_each_others_state(procs, tmp_path):
    """DDP across nodes, FSDP2 inside node0 (HSDP): two ranks, each half of every block and
    of its AdamW state; every step each rank averages its own region of the gradients with
    node1's (one process, the whole model: regions match by position in the whole vector)
    and keeps its region of the weights and moments, published in parts. Each of node0's
    ranks writes its own shards: started again, node0 resumes with the weights it ended with,
    and a fresh one-process node2 joins it and adopts its state (weights and AdamW moments
    fetched in parts from both ranks, checked against node0's hash). ``loco export`` puts the
    shards together."""
    out = tmp_path / "run"
    common = ["node", "start", "--out", str(out), *_sets("swarm.wait_for_peers=1", "optim.algorithm='ddp'")]

    def run(rounds: int, name: str, other: str) -> None:
        a = procs.loco(*common, "--set", f"train.rounds={rounds}", "--node-id", "node0", "--nproc-per-node", "2",
                       "--set", "node.parallel='fsdp'", log=f"node0-{name}")
        b = procs.loco(*common, "--set", f"train.rounds={rounds}", "--node-id", other, "--join-file",
                       str(out / "nodes" / "node0.json"), log=f"{other}-{name}")
        for node, p in ((f"node0-{name}", a), (f"{other}-{name}", b)):
            assert _wait_exit(p, 300, node, procs) == 0, procs.log(node)[-3000:]
        (out / "nodes" / "node0.json").unlink()  # the second run's joiner waits for the new one

    run(2, "first", "node1")
    first_end = _outer(out, "node0")[-1]
    shards = sorted(p.name for p in (out / "checkpoints" / "node0.shards").iterdir())
    assert {"rank0.safetensors", "rank1.safetensors"} <= set(shards), shards  # (and a previous version each)
    run(4, "again", "node2")
    starts = _records(out, "node0", "start")
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["processes"] == 2
    assert starts[1]["round"] == 2 and starts[1]["weights_hash"] == first_end["weights_hash"]
    adopted = _records(out, "node2", "resync")  # node2 starts at round 0, node0 at 2
    assert adopted and adopted[0]["from_round"] < 2 <= adopted[0]["round"], adopted
    together = [hs for hs in _hashes_by_round(out, ["node0", "node1", "node2"]).values() if len(hs) == 2]
    assert len(together) >= 3 and all(len(set(hs.values())) == 1 for hs in together), together
    assert _outer(out, "node0")[-1]["val_loss"] < starts[0]["val_loss"]
    from loco.node.export import export_run

    made = export_run(out, tmp_path / "exported")
    assert (made.node, made.round, made.kind) == ("node0", 4, "gpt2") and (made.out / "model.safetensors").exists()


def test_nproc_per_node_and_parallel_are_checked():
    from loco.node.config import ConfigError, load_config

    assert load_config(None, ["node.nproc_per_node=2"]).node.parallel == "ddp"
    assert load_config(None, ["node.nproc_per_node=2", "node.parallel='fsdp'"]).node.parallel == "fsdp"
    with pytest.raises(ConfigError, match="node.parallel"):
        load_config(None, ["node.nproc_per_node=2", "node.parallel='tp'"])
    fsdp_ddp = ["node.nproc_per_node=2", "node.parallel='fsdp'", "optim.algorithm='ddp'"]
    assert load_config(None, fsdp_ddp).node.rank_exchange == "parallel"
    with pytest.raises(ConfigError, match="leave node.rank_exchange at 'parallel'"):
        load_config(None, [*fsdp_ddp, "node.rank_exchange='leader'"])
    assert load_config(None, ["node.nproc_per_node=2", "node.parallel='fsdp'",
                              "optim.algorithm='streaming_diloco'"]).optim.algorithm == "streaming_diloco"
    # a resolved config holds every key: loading it again must work (export, eval-skips, loco run)
    assert load_config(None, ["node.parallel='ddp'"]).node.nproc_per_node == 1
    with pytest.raises(ConfigError, match="a pipeline stage is one process"):
        load_config(None, ["node.nproc_per_node=2", "pipeline.stages=2", "model.n_layer=2"])


def test_fsdp_in_a_node_of_one_process_is_a_one_line_error():
    from click.testing import CliRunner

    from loco.node.cli import main

    result = CliRunner().invoke(main, ["node", "start", "--set", "node.parallel='fsdp'"])
    assert result.exit_code != 0 and "start it with --nproc-per-node N" in result.output


def test_a_rank_resumes_its_own_batches_from_rank_0s_count():
    import numpy as np

    from loco.node.data import Sampler

    data = np.arange(10_000, dtype=np.int64) % 251
    drawn, skipped = Sampler(data, 16, 4, seed=7), Sampler(data, 16, 4, seed=7)
    for _ in range(5):
        drawn.next_windows()
    skipped.advance(5)
    assert skipped.batches_drawn == 5
    assert (drawn.next_windows() == skipped.next_windows()).all()


