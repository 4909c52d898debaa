"""The GPU path on a real CUDA device (pytest -m cuda on a GPU machine; skipped elsewhere,
with the reason shown). The swarm tests of the CPU suite run on the GPU with
``pytest -m swarm --device cuda``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loco.node.checkpoint import load_checkpoint, save_checkpoint
from loco.node.checkpoint_writer import CheckpointWriter, private_copy
from loco.node.config import build_config
from loco.node.staging import StagedCommunicator
from loco.node.trainer import Trainer
from loco.optim import DiLoCo, WholeTensors
from loco.protocols.codecs import Compressor, Layout
from loco.protocols.messages import STATE_PART
from loco.protocols.state_sync import Snapshot, StateServer, fetch_state, parts_meta, tensors_hash
from loco.protocols.transport import Transport
from tests.conftest import read_records
from tests.test_devices import SMALL, _Mean
from tests.test_swarm import _outer, _sets, _wait_exit

pytestmark = pytest.mark.cuda


def _cfg(device: str, **train):
    data = {k: dict(v) for k, v in SMALL.items()}
    data["node"] = {"device": device}
    data["train"] = train
    return build_config(data)


def test_trainer_runs_on_the_gpu_in_fp32_and_bf16():
    for precision in ("fp32", "bf16"):
        t = Trainer(_cfg("cuda", precision=precision), "g")
        before = [p.detach().clone() for p in t.params]
        losses = [t.train_step() for _ in range(5)]
        assert t.device.type == "cuda" and all(p.is_cuda and p.dtype == torch.float32 for p in t.params)
        assert all(abs(x) < 10 for x in losses)  # finite and sane (raises if not finite)
        assert all(not torch.equal(a, p) for a, p in zip(before, t.params, strict=True))


def test_a_background_checkpoint_of_gpu_state_holds_the_state_at_submit_and_the_trainer_feeds_pinned_batches(
        tmp_path):
    t = Trainer(_cfg("cuda", compile=False), "g")
    for _ in range(3):
        t.train_step(read_loss=False)
    assert t.batches.state_dict()["batches_drawn"] == 3  # the fourth batch, prefetched, is not counted
    submitted = {k: v.detach().cpu().clone() for k, v in t.model.state_dict().items()}
    writer = CheckpointWriter(tmp_path / "g.safetensors", keep=0, on_error=lambda tag, exc: pytest.fail(str(exc)))
    writer.submit({"trainer": private_copy(t.state_dict()), "round": 3})
    for _ in range(3):  # training goes on while the writer moves the copy to the host
        t.train_step(read_loss=False)
    writer.close()
    saved = load_checkpoint(tmp_path / "g.safetensors")
    assert saved["trainer"]["sampler"]["batches_drawn"] == 3
    for k, v in submitted.items():
        assert torch.equal(saved["trainer"]["model"][k], v), k
    resumed = Trainer(_cfg("cuda", compile=False), "g")
    resumed.load_state_dict(saved["trainer"])  # draws the prefetched batch again: the same stream
    x, _ = resumed.batches.next()
    t2 = Trainer(_cfg("cuda", compile=False), "g")
    for _ in range(3):
        t2.train_step(read_loss=False)
    assert torch.equal(x, t2.batches.next()[0])


def test_a_published_snapshot_of_gpu_state_reaches_the_host_as_it_was_at_publish():
    hasher = ThreadPoolExecutor(max_workers=1)
    try:
        state = [torch.randn(1 << 20, device="cuda"), torch.randn(64, 64, device="cuda")]
        expected = [t.cpu() for t in state]
        snap = Snapshot(2, [t.clone() for t in state], {}, prefix=1, hasher=hasher)  # what StateServer.publish makes
        for t in state:  # training goes on at once and modifies its state
            t.mul_(3).add_(1)
        assert all(t.device.type == "cpu" and torch.equal(t, e) for t, e in zip(snap.tensors, expected, strict=True))
        assert snap.digest == tensors_hash(expected) and snap.prefix_digest == tensors_hash(expected[:1])
    finally:
        hasher.shutdown(wait=True)


def test_a_part_of_a_state_in_gpu_memory_is_served_from_the_host_without_a_hash_of_its_own():
    """A rank's part of a state served in parts (split_state.py): its server moves the copy
    to host memory off the training thread and hashes nothing; a peer fetches the whole
    through the leader and checks it against the leader's hash."""
    a, b = Transport("gpu-part-a"), Transport("gpu-part-b")
    part_server, leader = StateServer(a, kind=STATE_PART, keep=2, hashed=False), StateServer(a)
    try:
        shapes = [(1024, 1024), (257,)]
        part = torch.randn(1024 * 1024 + 257, device="cuda")
        expected = part.cpu().clone()
        snap = part_server.publish(3, [part], {})
        part.mul_(3).add_(1)  # training goes on at once and modifies its weights
        (moved,) = snap.tensors
        assert moved.device.type == "cpu" and torch.equal(moved, expected) and snap.digest == ""
        whole = [expected[:1024 * 1024].view(1024, 1024), expected[1024 * 1024:]]
        leader.publish(3, [], {"parts": parts_meta([a.endpoint], 3, [shapes])}, digests=("", tensors_hash(whole)))
        got = fetch_state(b, a.endpoint, 3, timeout_s=30)
        assert got is not None and all(torch.equal(x, y) for x, y in zip(got.tensors, whole, strict=True))
    finally:
        for closing in (part_server, leader, a, b):
            closing.close()


def test_checkpoints_move_between_gpu_and_cpu(tmp_path):
    for src, dst in (("cuda", "cpu"), ("cpu", "cuda")):
        a = Trainer(_cfg(src), "a")
        for _ in range(3):
            a.train_step()
        path = tmp_path / f"{src}.pt"
        save_checkpoint(path, {"trainer": a.state_dict()})
        b = Trainer(_cfg(dst), "b")
        b.load_state_dict(load_checkpoint(path)["trainer"])
        for p, q in zip(a.params, b.params, strict=True):
            assert q.device.type == dst and torch.equal(p.cpu(), q.cpu())
        b.train_step()  # the AdamW state moved too


def test_outer_state_on_the_cpu_matches_state_on_the_gpu_and_staging_does_not_grow():
    runs = {}
    for state_device in (None, "cpu"):
        t = Trainer(_cfg("cuda"), "g")
        comm = StagedCommunicator(_Mean(), t.device)
        outer = DiLoCo(t.params, comm, 0.7, 0.9, True, state_device)
        allocations = []
        for r in range(4):
            for _ in range(3):
                t.train_step()
            assert outer.outer_step(r).applied
            allocations.append(comm.staging.allocations)
        runs[state_device] = [p.detach().cpu().clone() for p in t.params]
        if state_device == "cpu":
            assert outer.anchor[0].device.type == "cpu" and outer.anchor[0].is_pinned()
            assert allocations == [0] * 4  # Δ is already on the host: nothing to stage
        else:
            assert outer.anchor[0].is_cuda
            assert allocations[1:] == [allocations[1]] * 3 and allocations[1] <= 4  # no growth
            assert comm.staging._host[0].is_pinned()
    for a, b in zip(runs[None], runs["cpu"], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.swarm
def test_two_nodes_on_the_gpu(procs, tmp_path):
    """One GPU: both nodes on it; two or more: `loco swarm` gives each node its own."""
    out = tmp_path / "run"
    p = procs.loco("swarm", "--nodes", "2", "--out", str(out),
                   *_sets("train.rounds=4", "node.device='auto'"), log="swarm")
    assert _wait_exit(p, 420, "swarm", procs) == 0, procs.log("swarm")[-3000:]
    gpus = torch.cuda.device_count()
    for i in range(2):
        start = next(r for r in read_records(out / "metrics" / f"node{i}.jsonl") if r["event"] == "start")
        assert start["device"] == f"cuda:{i % gpus}"
    a, b = _outer(out, "node0"), _outer(out, "node1")
    assert [r["weights_hash"] for r in a] == [r["weights_hash"] for r in b]
    assert a[-1]["val_loss"] < next(r for r in read_records(out / "metrics" / "node0.jsonl")
                                    if r["event"] == "start")["val_loss"]


def test_gap_aware_norms_are_the_same_summed_on_the_gpu_as_on_the_cpu():
    """CO2's gap-aware penalty reads per-tensor norms, which must come out the same on every
    replica: float64 sums (whose order differs between devices) rounded to 16 bits."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1500, 1100, generator=g) * 3, torch.randn(5000, generator=g), torch.zeros(7)]
    whole = WholeTensors.own(tensors)
    assert whole.norms([t.cuda() for t in tensors]) == whole.norms(tensors)


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
def test_quantizers_with_error_feedback_put_the_same_bits_on_the_wire_from_the_gpu(codec):
    """Encoding on the GPU (residuals kept there) sends exactly what encoding on the CPU
    sends, round after round, ragged blocks and exact zeros included."""
    layout = Layout([(300, 257), (1000,), (64, 64)])  # pieces that are not whole blocks
    g = torch.Generator().manual_seed(1)
    cpu, gpu = Compressor(codec), Compressor(codec)
    for rnd in range(3):
        x = torch.randn(layout.total, generator=g) * 10.0 ** -rnd
        x[1000:1300] = 0.0  # a block of zeros sends code 0's value, not NaN
        lo, hi = 5000, layout.total - 7  # a slice across layers
        w_cpu, m_cpu, d_cpu = cpu.encode("s", x[lo:hi], lo, layout)
        w_gpu, m_gpu, d_gpu = gpu.encode("s", x[lo:hi].cuda(), lo, layout)
        assert m_cpu == m_gpu and d_gpu.is_cuda
        assert all(t.device.type == "cpu" for t in w_gpu)
        for a, b in zip(w_cpu, w_gpu, strict=True):
            assert a.dtype == b.dtype and a.numpy().tobytes() == b.numpy().tobytes()
        assert torch.equal(d_cpu, d_gpu.cpu())
        cpu.commit()
        gpu.commit()


@pytest.mark.swarm
@pytest.mark.parametrize("algorithm", ["co2", "streaming_diloco", "noloco", "ddp"])
def test_members_sharded_with_fsdp_over_nccl_train_together_on_the_gpu(procs, tmp_path, algorithm):
    """Two members of one rank each (NCCL inside, its per-step messages over gloo beside
    it), their parameters FSDP2 DTensors: rank 0 gathers them for CO2's outer step (which
    lands a round later) and scatters the result; Streaming DiLoCo's rank 0 gathers and
    scatters a fragment's parameters at each step where it leaves or lands; NoLoCo's leaders
    agree, then send their [φ | θ − φ] in parts (its replicas differ by design: only the
    pairing is checked); DDP's every step reads the gradient shards into its region (here
    the whole vector), averages it, writes the mean back, and publishes the weights and the
    AdamW moments read out of the shards; fused AdamW on the shards. (Members of two GPUs each need a machine
    with four: tests/test_ranks.py runs them over gloo.)"""
    import re

    from tests.conftest import wait_until
    from tests.test_ranks import _finish, _ranks

    common = ["--device", "cuda", "--parallel", "fsdp", "--algorithm", algorithm, "--inner-steps", "10", "--steps", "60",
              "--peers", "1", "--nproc-per-node", "1"]
    ra, rb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a = procs.python("examples/ddp_node.py", *common, "--seed", "1", "--report", str(ra), log="a")
    token = wait_until(lambda: re.search(r"join with: (\S+)", procs.log("a")), 180, "a's join token").group(1)
    b = procs.python("examples/ddp_node.py", *common, "--seed", "2", "--join", token, "--report", str(rb), log="b")
    _finish(a, procs, "a")
    _finish(b, procs, "b")
    (a0,), (b0,) = _ranks(ra, 1), _ranks(rb, 1)
    ok_b = {r["round"]: r["weights_hash"] for r in b0[:-1] if r["status"] == "ok" and r["group_size"] == 2}
    together = [r for r in a0[:-1] if r["round"] in ok_b and r["status"] == "ok" and r["group_size"] == 2]
    assert len(together) >= 3, (a0, b0)
    assert algorithm == "noloco" or all(r["weights_hash"] == ok_b[r["round"]] for r in together), (a0, b0)
    assert a0[-1]["val_loss"] < 0.85 * a0[0]["val_loss"], a0
