"""Device selection, host staging of GPU tensors, checkpoint portability and bf16 autocast,
checked on the CPU (CI). The same paths on a real GPU: tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from loco.node.checkpoint import load_checkpoint, save_checkpoint
from loco.node.config import ConfigError, build_config
from loco.node.devices import resolve_device, swarm_devices
from loco.node.staging import HostStaging, StagedCommunicator
from loco.node.trainer import Trainer
from loco.optim.communicator import ReduceResult

SMALL = {"model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16},
         "data": {"batch_size": 4, "max_bytes": 200_000, "val_batches": 1}}


def _cfg(**sections):
    data = {k: dict(v) for k, v in SMALL.items()}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return build_config(data)


def test_device_names_are_checked_in_the_config():
    for good in ("auto", "cpu", "cuda", "cuda:1"):
        assert _cfg(node={"device": good}).node.device == good
    for bad in ("gpu", "cuda:", "cuda:x", "CUDA", "mps0"):
        with pytest.raises(ConfigError, match="node.device"):
            _cfg(node={"device": bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_auto_is_the_cpu_here_and_a_missing_gpu_is_a_clear_error():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device(spec)


def test_a_local_swarm_spreads_nodes_over_the_gpus():
    assert swarm_devices(5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert swarm_devices(4, 2, nodes_per_gpu=2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert swarm_devices(3, 8) == ["cuda:0", "cuda:1", "cuda:2"]
    assert swarm_devices(2, 0) == ["cpu", "cpu"]


class _Mean:
    """One-member 'swarm': the mean is the input, returned in a buffer of its own (as the
    collective does)."""

    def __init__(self):
        self.calls = 0

    def all_reduce_mean(self, tensors, round, span=1):
        self.calls += 1
        return ReduceResult([t.detach().clone().float() for t in tensors], 1)


def test_host_staging_reuses_its_buffers_across_rounds():
    staging = HostStaging("cpu")
    shapes = [(3, 4), (5,), (2, 2, 2)]
    seen = set()
    for _ in range(6):
        tensors = [torch.randn(s) for s in shapes]
        slot, host = staging.to_host(tensors)
        assert all(torch.equal(h, t) for h, t in zip(host, tensors, strict=True))
        out = staging.to_device(slot, [h * 2 for h in host])
        assert all(torch.equal(o, 2 * t) for o, t in zip(out, tensors, strict=True))
        seen.add((slot, host[0].data_ptr()))
    assert staging.allocations == 2  # one host buffer per slot, made in the first two rounds
    assert len(seen) == 2  # and the same two buffers every round after


def test_staging_grows_once_for_a_larger_message_and_never_shrinks():
    staging = HostStaging("cpu", slots=1)
    staging.to_host([torch.zeros(10)])
    staging.to_host([torch.zeros(100)])
    for _ in range(3):
        staging.to_host([torch.zeros(50)])
    assert staging.allocations == 2


def test_staged_communicator_passes_cpu_tensors_straight_through():
    inner = _Mean()
    comm = StagedCommunicator(inner, "cpu")
    x = [torch.randn(4)]
    result = comm.all_reduce_mean(x, 0)
    assert torch.equal(result.tensors[0], x[0]) and inner.calls == 1
    assert comm.staging.allocations == 0


def test_checkpoints_load_whatever_device_they_were_saved_on(tmp_path):
    cfg = _cfg()
    a = Trainer(cfg, "a")
    for _ in range(3):
        a.train_step()
    path = tmp_path / "a.pt"
    save_checkpoint(path, {"trainer": a.state_dict()})
    # map_location decides where tensors land, whatever device wrote them (the file holds
    # host copies): the host, or the device the loading trainer runs on
    for where in ("cpu", resolve_device(cfg.node.device)):
        b = Trainer(cfg, "b")
        b.load_state_dict(load_checkpoint(path, map_location=where)["trainer"])
        for p, q in zip(a.params, b.params, strict=True):
            assert torch.equal(p, q) and q.device == b.device
        assert b.step == 3


def test_bf16_autocast_trains_with_fp32_weights():
    fp32 = Trainer(_cfg(), "n")
    bf16 = Trainer(_cfg(train={"precision": "bf16"}), "n")
    l32 = [fp32.train_step() for _ in range(3)]
    l16 = [bf16.train_step() for _ in range(3)]
    assert all(p.dtype == torch.float32 for p in bf16.params)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in bf16.params)
    assert l16 != l32 and abs(l16[0] - l32[0]) < 0.1  # autocast really ran, and agrees roughly
