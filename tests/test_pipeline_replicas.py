"""A stage's replicas averaging their gradients every iteration (pipeline.sync =
"every_step", through optim's DataParallel): two replicas in one process over real ZeroMQ
sockets, against a hand-computed AdamW step on the microbatch-weighted mean."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from loco.node.config import build_config
from loco.node.pipeline.replica_sync import ReplicaSync
from loco.node.pipeline.stage_state import StageState
from loco.protocols.membership import PeerInfo
from loco.protocols.pipeline.plan import Iteration
from loco.protocols.state_sync import tensors_hash
from loco.protocols.transport import Transport

CFG = build_config({"model": {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8},
                    "pipeline": {"stages": 2, "stage": 1}, "optim": {"warmup_steps": 0, "grad_clip": 0.0},
                    "collective": {"matchmaking_timeout_s": 10, "join_timeout_s": 20}})


class _Both:
    """Each replica's DHT view: the other one, at every iteration."""

    def __init__(self, transports: dict[str, Transport], me: str):
        self.transports, self.me = transports, me

    def peers(self, strict: bool = False) -> list[PeerInfo]:
        return [PeerInfo(n, t.endpoint, 0, 1) for n, t in self.transports.items() if n != self.me]


@pytest.fixture
def replicas():
    transports = {n: Transport(n) for n in ("a", "b")}
    stop = threading.Event()
    made = {}
    for n, t in transports.items():
        state = StageState(CFG, 1, torch.device("cpu"))
        made[n] = (state, ReplicaSync(CFG, state, t, _Both(transports, n), stop, lambda: 0))
    yield transports, made
    stop.set()
    for t in transports.values():
        t.close(flush_s=0.5)


def _work(me: str, transports, number: int, visited: list[int]) -> Iteration:
    meta = {"paths": [], "endpoints": {n: t.endpoint for n, t in transports.items()}, "stages": {"a": 1, "b": 1}}
    work = Iteration(me, number, meta)
    work.visited.extend(visited)
    return work


def _step_both(transports, made, visited: dict[str, list[int]], grads: dict[str, list[torch.Tensor]], number: int):
    out = {}

    def go(n):
        state, sync = made[n]
        for p, g in zip(state.params, grads[n], strict=True):
            p.grad = g.clone() if g is not None else None
        out[n] = sync.step(_work(n, transports, number, visited[n]))

    threads = [threading.Thread(target=go, args=(n,)) for n in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_replicas_step_on_the_microbatch_weighted_mean_and_stay_identical(replicas):
    transports, made = replicas
    ref = copy.deepcopy(made["a"][0])  # the same seed: the replicas' common start
    torch.manual_seed(0)
    # a ran two microbatches (its gradient is their sum), b one
    sums = {n: [torch.randn_like(p) for p in made[n][0].params] for n in made}
    out = _step_both(transports, made, {"a": [0, 1], "b": [2]}, sums, 0)
    assert out == {"a": ("ok", 2, ""), "b": ("ok", 2, "")}, out
    for p, ga, gb in zip(ref.params, sums["a"], sums["b"], strict=True):
        p.grad = (ga + gb) / 3  # the mean over the group's three microbatches
    ref.opt.step()
    for n in made:
        for p, q in zip(made[n][0].params, ref.params, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert tensors_hash(made["a"][0].params) == tensors_hash(made["b"][0].params)


def test_an_iteration_in_which_no_replica_ran_a_microbatch_steps_nothing(replicas):
    transports, made = replicas
    before = tensors_hash(made["a"][0].params)
    none = {n: [None] * len(made[n][0].params) for n in made}
    out = _step_both(transports, made, {"a": [], "b": []}, none, 0)
    assert [o[0] for o in out.values()] == ["ok", "ok"], out
    # (an AdamW step on zeros would still move the weights: weight decay)
    assert tensors_hash(made["a"][0].params) == tensors_hash(made["b"][0].params) == before
    # one replica that ran alone gives the other its gradient
    torch.manual_seed(1)
    grads = {"a": [torch.randn_like(p) for p in made["a"][0].params], "b": none["b"]}
    out = _step_both(transports, made, {"a": [0], "b": []}, grads, 1)
    assert [o[0] for o in out.values()] == ["ok", "ok"], out
    assert tensors_hash(made["a"][0].params) == tensors_hash(made["b"][0].params) != before
