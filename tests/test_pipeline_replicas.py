"""A stage's replicas averaging their gradients every iteration (pipeline.sync =
"every_step", through optim's DataParallel, sent straight to each other or through the group
all-reduce): two replicas in one process over real ZeroMQ sockets, against a hand-computed
AdamW step on the microbatch-weighted mean; replicas whose weights went apart find out."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from loco.node.config import build_config
from loco.node.pipeline.replica_sync import ReplicaSync
from loco.node.pipeline.stage_state import StageState
from loco.protocols.membership import PeerInfo
from loco.protocols.pipeline.plan import JOINING, REJOINING, Iteration
from loco.protocols.state_sync import tensors_hash
from loco.protocols.transport import Transport

RESTARTED = -100

CFG = build_config({"model": {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 8},
                    "pipeline": {"stages": 2, "stage": 1}, "optim": {"warmup_steps": 0, "grad_clip": 0.0},
                    "collective": {"matchmaking_timeout_s": 10, "join_timeout_s": 20}})


class _Both:
    """Each replica's DHT view: the other one, at iteration 0 (``gone``: the round the view
    shows instead, None: not at all, RESTARTED: a new process of that id)."""

    def __init__(self, transports: dict[str, Transport], me: str, gone: dict[str, int]):
        self.transports, self.me, self.gone = transports, me, gone

    def peers(self, strict: bool = False) -> list[PeerInfo]:
        shown = []
        for n, t in self.transports.items():
            round = self.gone.get(n, 0)
            if n == self.me or round is None:
                continue
            # (RESTARTED: a new process under that id, at another endpoint, joining)
            shown.append(PeerInfo(n, "tcp://127.0.0.1:1" if round == RESTARTED else t.endpoint,
                                  JOINING if round == RESTARTED else round, 1))
        return shown


@pytest.fixture(params=["direct", "collective"])
def replicas(request):
    cfg = CFG.model_copy(update={"pipeline": CFG.pipeline.model_copy(update={"replica_exchange": request.param})})
    transports = {n: Transport(n) for n in ("a", "b")}
    stop = threading.Event()
    made = {}
    gone: dict[str, int | None] = {}
    for n, t in transports.items():
        state = StageState(cfg, 1, torch.device("cpu"))
        made[n] = (state, ReplicaSync(cfg, state, t, _Both(transports, n, gone), stop, lambda: 0))
    yield transports, made, gone
    stop.set()
    for t in transports.values():
        t.close(flush_s=0.5)


def _work(me: str, transports, number: int, visited: list[int]) -> Iteration:
    meta = {"paths": [], "endpoints": {n: t.endpoint for n, t in transports.items()}, "stages": {"a": 1, "b": 1}}
    work = Iteration(me, number, meta)
    work.visited.extend(visited)
    return work


def _step_both(transports, made, visited: dict[str, list[int]], grads: dict[str, list[torch.Tensor]], number: int,
               late: str = ""):
    """Each replica in ``made`` steps iteration ``number`` (in its own thread, as nodes do);
    ``late`` starts 2.5 s after the other (past its first look at the DHT view)."""
    out = {}

    def go(n):
        if n == late:
            time.sleep(2.5)
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
    transports, made, gone = replicas
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
    transports, made, gone = replicas
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


@pytest.mark.parametrize("replicas", ["direct"], indirect=True)
def test_direct_replicas_whose_weights_went_apart_find_out_and_the_larger_id_steps_out(replicas):
    """b's weights differ from a's (it missed a message of an earlier exchange): each leaves
    the other out of its mean; a, the smallest id, steps on its own gradient, b does not
    step and is behind (the node then joins again to be handed a replica's state)."""
    transports, made, gone = replicas
    with torch.no_grad():
        made["b"][0].params[0].add_(1e-3)
    ref = copy.deepcopy(made["a"][0])
    before_b = tensors_hash(made["b"][0].params)
    torch.manual_seed(2)
    grads = {n: [torch.randn_like(p) for p in made[n][0].params] for n in made}
    out = _step_both(transports, made, {"a": [0], "b": [1]}, grads, 0)
    assert out["a"] == ("ok", 1, "") and out["b"][0] == "apart", out
    assert not made["a"][1].behind and made["b"][1].behind
    for p, g in zip(ref.params, grads["a"], strict=True):
        p.grad = g.clone()
    ref.opt.step()
    for p, q in zip(made["a"][0].params, ref.params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert tensors_hash(made["b"][0].params) == before_b


@pytest.mark.parametrize("replicas", ["direct"], indirect=True)
def test_a_direct_replica_whose_partner_left_steps_on_its_own_gradient_without_waiting(replicas):
    transports, made, gone = replicas
    gone["b"] = None  # b left the DHT (it died): a's view no longer shows it
    ref = copy.deepcopy(made["a"][0])
    torch.manual_seed(3)
    grads = {"a": [torch.randn_like(p) for p in made["a"][0].params]}
    out = _step_both(transports, {"a": made["a"]}, {"a": [0, 1]}, grads, 0)
    assert out["a"] == ("ok", 1, ""), out
    for p, g in zip(ref.params, grads["a"], strict=True):
        p.grad = g / 2
    ref.opt.step()
    for p, q in zip(made["a"][0].params, ref.params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("replicas", ["direct"], indirect=True)
def test_a_direct_replica_waits_for_a_twin_still_joining_but_not_for_one_that_stepped_out(replicas):
    """Iteration 0 of a fresh swarm: b's record still says JOINING (it has not read the
    plan yet) and it comes seconds late: a waits, and both step on the mean. A replica that
    stepped out to be handed the state again says REJOINING: not waited for; nor one that
    died and whose id a new process took (another endpoint, joining)."""
    transports, made, gone = replicas
    gone["b"] = JOINING
    torch.manual_seed(4)
    grads = {n: [torch.randn_like(p) for p in made[n][0].params] for n in made}
    out = _step_both(transports, made, {"a": [0], "b": [1]}, grads, 0, late="b")
    assert out == {"a": ("ok", 2, ""), "b": ("ok", 2, "")}, out
    assert tensors_hash(made["a"][0].params) == tensors_hash(made["b"][0].params)
    for number, shown in enumerate((REJOINING, RESTARTED), start=1):
        # b is planned and shown a member as a's wait starts; it changes a second later
        gone["b"] = 0
        change = threading.Timer(1.0, gone.__setitem__, ("b", shown))
        change.start()
        out = _step_both(transports, {"a": made["a"]}, {"a": [0]}, grads, number)
        change.join()
        assert out["a"] == ("ok", 1, ""), (shown, out)


def test_diloco_between_replicas_weighs_each_by_the_microbatches_it_trained_on():
    """sync = diloco: a replica that ran 3 microbatches since the last outer step weighs 3
    times one that ran 1 in the pseudo-gradients' average (the scheduler may split a stage's
    microbatches unevenly between its replicas)."""
    cfg = CFG.model_copy(update={"pipeline": CFG.pipeline.model_copy(update={"sync": "diloco", "sync_every": 1})})
    transports = {n: Transport(n) for n in ("a", "b")}
    stop = threading.Event()
    try:
        made = {}
        for n, t in transports.items():
            state = StageState(cfg, 1, torch.device("cpu"))
            made[n] = (state, ReplicaSync(cfg, state, t, _Both(transports, n, {}), stop, lambda: 0))
        anchor = [p.detach().clone() for p in made["a"][0].params]
        torch.manual_seed(2)
        grads = {n: [torch.randn_like(p) for p in made[n][0].params] for n in made}
        thetas = {}
        for n in made:  # each replica's own inner step, as ReplicaSync takes it
            ref = StageState(cfg, 1, torch.device("cpu"))  # (the replicas' common start: the same seed)
            for p, g in zip(ref.params, grads[n], strict=True):
                p.grad = g / (3 if n == "a" else 1)
            ref.opt.step()
            thetas[n] = [p.detach().clone() for p in ref.params]
        out = _step_both(transports, made, {"a": [0, 1, 2], "b": [3]}, grads, 0)
        assert out == {"a": ("ok", 2, ""), "b": ("ok", 2, "")}, out
        o = cfg.optim  # the first outer step: buf = Δ, Nesterov: φ − η(1 + μ)Δ
        for i, phi in enumerate(anchor):
            delta = (3 * (phi - thetas["a"][i]) + (phi - thetas["b"][i])) / 4
            expected = phi - o.outer_lr * (1 + o.outer_momentum) * delta
            for n in made:
                torch.testing.assert_close(made[n][0].params[i].detach(), expected, rtol=0, atol=1e-6)
    finally:
        stop.set()
        for t in transports.values():
            t.close(flush_s=0.5)


@pytest.mark.parametrize("replicas", ["direct"], indirect=True)
def test_a_direct_replica_whose_gradient_is_far_larger_is_left_out_by_both_and_named_with_its_norm(replicas, caplog):
    transports, made, gone = replicas
    torch.manual_seed(2)
    grads = {n: [torch.randn_like(p) for p in made[n][0].params] for n in made}
    grads["b"] = [g * 1000 for g in grads["b"]]  # > max_norm_ratio (10) times a's
    with caplog.at_level("WARNING", logger="loco.node.direct_sync"):
        out = _step_both(transports, made, {"a": [0], "b": [1]}, grads, 0)
    # both apply a's gradient alone: the same weights, a group of one
    assert out == {"a": ("ok", 1, ""), "b": ("ok", 1, "")}, out
    assert tensors_hash(made["a"][0].params) == tensors_hash(made["b"][0].params)
    left_out = [r.getMessage() for r in caplog.records if "left out of the mean: b" in r.getMessage()]
    assert len(left_out) == 2 and all("norms {'a':" in m for m in left_out), left_out
