"""Members of several processes (``loco.Ranks``): DDP inside over gloo, loco across, real
processes on 127.0.0.1 (examples/ddp_node.py, started the way its docstring says)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import loco
from tests.conftest import read_records, wait_until

pytestmark = pytest.mark.swarm

EXAMPLE = "examples/ddp_node.py"


def _rank(report: Path, rank: int) -> Path:
    return report.with_name(f"{report.name}.rank{rank}")  # where the example's rank writes its records


def _ranks(report: Path, n: int) -> list[list[dict]]:
    return [read_records(_rank(report, r)) for r in range(n)]


def _finish(proc, procs, name: str, timeout_s: float = 300) -> None:
    code = proc.wait(timeout=timeout_s)
    assert code == 0, f"{name} exited {code}:\n{procs.log(name)[-3000:]}"


@pytest.mark.parametrize(("algorithm", "b_ranks", "parallel"),
                         [("diloco", 2, "ddp"), ("streaming_diloco", 1, "ddp"), ("ddp", 2, "ddp"),
                          ("co2_gap_aware", 1, "fsdp"), ("streaming_diloco", 1, "fsdp"), ("noloco", 1, "fsdp"),
                          ("ddp", 1, "fsdp")])
def test_members_of_several_ranks_train_agree_inside_and_across(procs, tmp_path, algorithm, b_ranks, parallel):
    """Member a has two ranks; member b two (DiLoCo; DDP: the leader broadcasts every step's
    swarm-wide gradient mean) or one (Streaming DiLoCo: fragments land mid-round, and a
    one-process member trains beside a two-process one). With FSDP inside (CO2: its reduce
    runs in the background and lands a round later; its gap-aware penalty reads norms of
    whole tensors, which a's ranks sum over their pieces and b computes whole) a's two ranks each hold half of every
    layer, and b is one process whose parameters are sharded over itself alone; Streaming
    DiLoCo with FSDP inside gathers the weights at every step a fragment leaves or lands.
    Every algorithm's exchange leaves from every rank (each its own region of the vector;
    node.rank_exchange "parallel"), whatever the other member's rank count: DiLoCo's on the
    training thread, DDP's every step, Streaming DiLoCo's and CO2's from the leader's
    background thread while the ranks train on. CO2 with FSDP inside: a's ranks each keep
    the outer state of their own region (half of b's; its statistics whole; DiLoCo's split is
    CO2's without the reduce in flight: its equivalence with one process, through a restore
    and a reload of its split checkpoint, is the test below). NoLoCo with FSDP inside: a's ranks each keep their region of the outer state
    and gossip it with b from their own endpoints once the leaders agreed; its replicas differ
    by design, so across members only their pairing (rounds averaged in a group of two) is
    checked. DDP with FSDP inside (int8-coded): every step each of a's ranks averages its own
    region of the gradients, read out of its gradient shards, with b's matching stretch, and
    each keeps its region of the weights and AdamW moments (half of b's)."""
    common = ["--algorithm", algorithm, "--inner-steps", "10", "--steps", "80", "--peers", "1",
              "--parallel", parallel]
    if algorithm == "co2_gap_aware":
        common[1:2] = ["co2", "--staleness", "gap_aware"]
    if algorithm == "ddp" and parallel == "fsdp":  # each rank's region int8-coded, with its own error feedback
        common += ["--compression", "int8"]
    ra, rb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = procs.python(EXAMPLE, "--nproc-per-node", "2", *common, "--seed", "1", "--report", str(ra), log="a")
    token = wait_until(lambda: re.search(r"join with: (\S+)", procs.log("a")), 180, "a's join token").group(1)
    b = procs.python(EXAMPLE, "--nproc-per-node", str(b_ranks), *common, "--seed", "2", "--join", token,
                     "--report", str(rb), log="b")
    _finish(a, procs, "a")
    _finish(b, procs, "b")
    a_ranks, b_ranks_ = _ranks(ra, 2), _ranks(rb, b_ranks)
    # every rank of a member reports the same rounds and outcomes, and holds the same weights
    for member in (a_ranks, b_ranks_):
        for other in member[1:]:
            assert [(r["round"], r["status"], r["model_hash"]) for r in other] == \
                   [(r["round"], r["status"], r["model_hash"]) for r in member[0]]
            if algorithm in ("diloco", "ddp") and parallel == "ddp":  # (sharded: a rank hashes its own shard)
                assert [r["weights_hash"] for r in other] == [r["weights_hash"] for r in member[0]]
    # across members: rounds both averaged together hold the same weights (the last round
    # lands what was in flight at each one's own last step: left out)
    ok_b = {r["round"]: r for r in b_ranks_[0][:-1] if r["status"] == "ok" and r["group_size"] == 2}
    together = [r for r in a_ranks[0][:-1] if r["status"] == "ok" and r["group_size"] == 2 and r["round"] in ok_b]
    assert len(together) >= 3, (a_ranks[0], b_ranks_[0])
    for r in together:
        assert algorithm == "noloco" or r["weights_hash"] == ok_b[r["round"]]["weights_hash"], \
            f"round {r['round']}: members differ"
    assert a_ranks[0][-1]["val_loss"] < 0.85 * a_ranks[0][0]["val_loss"], a_ranks[0]
    for member in (a_ranks, b_ranks_):  # rank 1 sent its own region
        for other in member[1:]:
            assert other[-1]["rank_bytes_sent"] > 0, other[-1]
    if parallel == "fsdp":
        # a's outer state is split over its ranks, and served in parts: each keeps half of what b's one
        # process does (anchor, momentum and their published copy); none holds them whole. CO2's gap
        # statistics (16 bytes for each of the model's 6 tensors) are whole on every rank, and the
        # leader serves them too: half of b's copies of them and another copy on each rank
        whole = b_ranks_[0][-1]["outer_state_bytes"]
        stats = 96 if algorithm == "co2_gap_aware" else 0
        assert whole > 0 and all(0 < r[-1]["outer_state_bytes"] <= whole // 2 + stats + 64 for r in a_ranks), \
            ([r[-1]["outer_state_bytes"] for r in a_ranks], whole)


def test_with_rank_exchange_leader_rank_0_sends_everything(procs, tmp_path):
    """rank_exchange="leader": the member's other ranks open no endpoint and send nothing;
    the members still agree."""
    common = ["--algorithm", "diloco", "--inner-steps", "10", "--steps", "40", "--peers", "1",
              "--parallel", "fsdp", "--rank-exchange", "leader"]
    ra, rb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = procs.python(EXAMPLE, "--nproc-per-node", "2", *common, "--seed", "1", "--report", str(ra), log="a")
    token = wait_until(lambda: re.search(r"join with: (\S+)", procs.log("a")), 180, "a's join token").group(1)
    b = procs.python(EXAMPLE, "--nproc-per-node", "1", *common, "--seed", "2", "--join", token, "--report", str(rb),
                     log="b")
    _finish(a, procs, "a")
    _finish(b, procs, "b")
    a_ranks, (b_recs,) = _ranks(ra, 2), _ranks(rb, 1)
    assert all(r["rank_bytes_sent"] == 0 for r in a_ranks[1])
    ok_b = {r["round"]: r["weights_hash"] for r in b_recs[:-1] if r["status"] == "ok" and r["group_size"] == 2}
    together = [r for r in a_ranks[0][:-1] if r["round"] in ok_b and r["status"] == "ok" and r["group_size"] == 2]
    assert together and all(r["weights_hash"] == ok_b[r["round"]] for r in together), (a_ranks[0], b_recs)


@pytest.mark.parametrize(("parallel", "algorithm", "poison", "reload", "overlap", "exchange"),
                         [("ddp", "diloco", False, False, 1, "parallel"), ("fsdp", "diloco", False, True, 1, "parallel"),
                          ("fsdp", "streaming_diloco", False, True, 0, "parallel"),
                          ("fsdp", "streaming_diloco", True, False, 1, "parallel"),
                          ("fsdp", "streaming_diloco", False, False, 0, "leader"),
                          ("fsdp", "diloco", True, False, 1, "parallel"),
                          ("fsdp", "co2", False, True, 1, "parallel"),
                          ("fsdp", "co2_gap_aware", True, False, 1, "parallel"),
                          ("fsdp", "co2_gap_aware", False, True, 1, "parallel"),
                          ("fsdp", "noloco", False, True, 1, "parallel"), ("fsdp", "noloco", True, False, 1, "parallel"),
                          ("fsdp", "ddp", True, False, 1, "parallel")])
def test_a_member_of_two_ranks_trains_the_weights_one_process_trains_on_both_halves(procs, tmp_path, parallel,
                                                                                      algorithm, poison, reload,
                                                                                      overlap, exchange):
    """DDP or FSDP inside a member changes nothing but where the batch is computed: two
    ranks, each on half of every batch, end the outer rounds with the weights of one process
    that takes the whole batch, up to float32 rounding (the two halves' gradients are summed
    in another order: within 1e-5 after 15 AdamW steps in 3 rounds). With FSDP and DiLoCo
    every rank runs the outer step on its own region of the weights; Streaming DiLoCo's
    leader gathers the shards at every step a fragment leaves or lands and scatters the
    result back, only the parameters of the fragments it reads or writes at that step (with
    overlap 0 a fragment lands at the round's last step: what it wrote must not be gathered
    over again for the round's end); with ``rank_exchange="leader"`` the leader keeps the
    whole outer state and gathers those parameters whole, else every rank its region. CO2 with FSDP: every rank runs the outer step on its own region too, its
    reduce on its own background thread a round late; with the gap-aware penalty the ranks
    sum their pieces' squares into the norms of whole tensors and all keep the same
    statistics. Poisoned: a weight goes NaN at the last step of the second round, in rank 0's shard but rank 1's region
    of the outer state, and the member as a whole goes back to its state after the first round, as the one
    process does. Reloaded: after the second round every rank loads back the
    ``outer.state_dict()`` it saved after the first (each rank of the FSDP member its own
    region of the outer state), which brings back the first round's weights hash, and training
    goes on from there as in the one process."""
    out = {n: tmp_path / f"{n}.pt" for n in (1, 2)}
    extra = ["--poison-step", "9"] if poison else []
    extra += ["--reload-step", "9"] if reload else []
    runs = {n: procs.python("-m", "tests.loops.ranks_equivalence", "--ranks", str(n), "--parallel", parallel,
                            "--algorithm", algorithm, "--overlap", str(overlap), "--rank-exchange", exchange, "--out", str(out[n]), *extra,
                            log=f"r{n}") for n in (1, 2)}
    for n, p in runs.items():
        _finish(p, procs, f"r{n}")
    one, two = (torch.load(out[n]) for n in (1, 2))
    assert one["restored"] == two["restored"] == ([1] if poison else []), (one["restored"], two["restored"])
    if reload:
        for run in (one, two):
            round_, now, saved = run["reloaded"]
            assert round_ == 1 and now == saved, run["reloaded"]
    assert max((a - b).abs().max().item() for a, b in zip(one["final"], two["final"], strict=True)) < 1e-5
    # and they trained: far from where they started
    assert max((a - b).abs().max().item() for a, b in zip(one["final"], one["initial"], strict=True)) > 1e-2


def test_sharded_parameters_need_ranks_and_ddp_float32_parameters(tmp_path):
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="some of the model's parameters are sharded"):
            loco.Ranks().check_same_weights([sharded, torch.nn.Parameter(torch.randn(3))])
        loco.Ranks().check_same_weights([sharded])  # sharded over the member's one rank
        opt = torch.optim.AdamW([sharded])
        with pytest.raises(ValueError, match="pass ranks=loco.Ranks()"):
            loco.DiLoCo([sharded], opt, None)
        half = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4, dtype=torch.bfloat16), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="needs float32 parameters .one is torch.bfloat16"):
            loco.DDP([half], torch.optim.AdamW([half]), None, ranks=loco.Ranks())
    finally:
        torch.distributed.destroy_process_group()
