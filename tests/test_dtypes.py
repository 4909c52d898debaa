"""Parameters of a low-precision dtype: every algorithm keeps its outer state in float32 and
writes the result back in the parameters' own dtype (a user's bf16 model stays bf16)."""

from __future__ import annotations

import pytest
import torch

from loco.optim import CO2, DataParallel, DiLoCo, NoLoCo, StreamingDiLoCo
from tests.fakes import SoloComm


class SoloGroup:
    """NoLoCo's group of one."""

    def group_mean(self, tensors, round):
        from loco.optim.communicator import ReduceResult

        return ReduceResult([t.clone().float() for t in tensors], 1)


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(8, 4).to(dtype)), torch.nn.Parameter(torch.randn(4).to(dtype))]


def _train(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(0.01)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", ["diloco", "co2", "noloco", "streaming"])
def test_outer_steps_keep_the_parameters_dtype_and_float32_state(dtype, algorithm):
    params = _params(dtype)
    math = {
        "diloco": lambda: DiLoCo(params, SoloComm(), outer_lr=1.0, momentum=0.0),
        "co2": lambda: CO2(params, SoloComm(), background=False),
        "noloco": lambda: NoLoCo(params, SoloGroup()),
        "streaming": lambda: StreamingDiLoCo(params, SoloComm(), [[0], [1]], inner_steps=2, outer_lr=1.0,
                                             momentum=0.0),
    }[algorithm]()
    before = [p.detach().float().clone() for p in params]
    for step in range(1, 5):
        _train(params)
        if algorithm == "streaming":
            math.after_inner_step(step)
        elif step % 2 == 0:
            math.outer_step(step // 2)
    assert all(p.dtype == dtype for p in params)
    assert all(a.dtype == torch.float32 for a in math.anchor)
    # the replica moved (the outer steps applied the local progress) and θ holds φ in its dtype
    assert any(not torch.equal(p.float(), b) for p, b in zip(params, before, strict=True))
    if algorithm != "streaming":
        assert all(torch.equal(p, a.to(dtype)) for p, a in zip(params, math.anchor, strict=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddp_writes_the_mean_gradient_in_the_parameters_dtype(dtype):
    params = _params(dtype)
    for p in params:
        p.grad = torch.ones_like(p)
    assert DataParallel(params, SoloComm()).sync_gradients(0)
    assert all(p.grad.dtype == dtype and torch.all(p.grad == 1) for p in params)
