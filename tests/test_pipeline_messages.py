"""A pipeline node's checks on what it receives: a malformed plan or task is dropped with a
reason (tests of the pure checks; the swarm tests cover the happy path)."""

from __future__ import annotations

import torch

from loco.node.checkpoint import save_checkpoint
from loco.node.config import build_config
from loco.node.pipeline import PipelineNode
from loco.protocols.pipeline.plan import BWD, DROP, FWD, Iteration, check_plan, check_task
from loco.protocols.state_sync import tensors_hash
from loco.protocols.wire import Message

SHAPE = (2, 8, 16)
PLAN = {"paths": [["a", "b", "c", "a"], ["d", "c", "d"]], "eval": [["a", "b", "c", "a"]],
        "endpoints": {n: f"tcp://127.0.0.1:{i + 1000}" for i, n in enumerate("abcd")},
        "stages": {"a": 0, "b": 1, "c": 2, "d": 0}}


def _msg(kind, tensors=None, **meta):
    return Message(kind, round=0, meta=meta, tensors=[torch.zeros(SHAPE)] if tensors is None else tensors)


def test_a_good_plan_and_its_tasks_pass():
    assert check_plan(PLAN) is None
    assert check_plan({**PLAN, "joins": {"b": "a", "c": ""}}) is None
    work = Iteration("c", 0, PLAN)
    assert work.todo == 2 + 2 + 1  # middle of mb 0 (fwd + bwd), middle of mb 1, eval forward
    assert check_task(work, _msg(FWD, mb=0, hop=2, eval=False), SHAPE) is None
    assert check_task(work, _msg(BWD, mb=1, hop=1, eval=False), SHAPE) is None
    assert check_task(work, _msg(FWD, mb=0, hop=2, eval=True), SHAPE) is None
    assert check_task(work, _msg(DROP, tensors=[], mb=1, eval=False), SHAPE) is None


def test_malformed_plans_are_named():
    bad = [({**PLAN, "paths": "x"}, "paths is not a list"),
           ({**PLAN, "paths": [["a", "b"]]}, "malformed path"),
           ({**PLAN, "paths": [["a", "b", "e", "a"]]}, "malformed path"),  # e has no endpoint
           ({**PLAN, "paths": [["a", "b", "c", "d"]]}, "malformed path"),  # does not return home
           ({**PLAN, "endpoints": ["a"]}, "endpoints"),
           ({**PLAN, "stages": {"a": "zero"}}, "stages"),
           ({**PLAN, "stages": {**PLAN["stages"], "e": 1}}, "stages"),  # e has no endpoint
           ({**PLAN, "joins": ["e"]}, "joins"),
           ({**PLAN, "joins": {"e": "a"}}, "joins"),  # the joiner has no endpoint
           ({**PLAN, "joins": {"b": "e"}}, "joins"),  # nor its source
           ({**PLAN, "joins": {"b": 1}}, "joins")]
    for meta, reason in bad:
        assert reason in (check_plan(meta) or ""), meta


def test_malformed_tasks_are_named():
    work = Iteration("c", 0, PLAN)
    cases = [
        (_msg(FWD, hop=2, eval=False), "mb/eval"),
        (_msg(FWD, mb="0", hop=2, eval=False), "mb/eval"),
        (_msg(FWD, mb=True, hop=2, eval=False), "mb/eval"),
        (_msg(FWD, mb=7, hop=2, eval=False), "no microbatch 7"),
        (_msg(FWD, mb=0, hop=9, eval=False), "not a PP_FWD hop"),
        (_msg(FWD, mb=0, hop="2", eval=False), "not a PP_FWD hop"),
        (_msg(BWD, mb=0, hop=3, eval=False), "not a PP_BWD hop"),  # the tail starts the backward itself
        (_msg(FWD, mb=0, hop=1, eval=False), "is b, not this node"),
        (_msg(BWD, mb=0, hop=2, eval=True), "validation"),
        (_msg(FWD, [torch.zeros(2, 8, 15)], mb=0, hop=2, eval=False), "expected one float32 tensor"),
        (_msg(FWD, [torch.zeros(SHAPE, dtype=torch.float64)], mb=0, hop=2, eval=False), "float32"),
        (_msg(FWD, [], mb=0, hop=2, eval=False), "expected one"),
    ]
    for msg, reason in cases:
        assert reason in (check_task(work, msg, SHAPE) or ""), (msg.meta, check_task(work, msg, SHAPE))


def _stage_node(tmp_path, name: str, stage: int = 1) -> PipelineNode:
    """A stage node's model and inner optimizer, without its network parts."""
    cfg = build_config({"model": {"n_layer": 3, "n_embd": 16, "n_head": 2, "block_size": 8},
                        "pipeline": {"stages": 3, "stage": stage}, "node": {"id": name}})
    node = PipelineNode(cfg, tmp_path / name)
    node.device = torch.device("cpu")
    node._build_model()
    return node


def test_a_stage_state_hand_off_makes_an_identical_replica_and_a_bad_one_changes_nothing(tmp_path):
    source, joiner = _stage_node(tmp_path, "a"), _stage_node(tmp_path, "b")
    x = torch.randn(2, 8, 16)
    for _ in range(2):  # the source trained: its weights and moments are not the seed's
        source.model.blocks(x).square().mean().backward()
        source.opt.step()
        source.opt.zero_grad()
    tensors, meta = source._stage_state()
    seed = tensors_hash(joiner._state_tensors())
    bad = [(tensors, {**meta, "stage": 2}, "stage 2"),
           (tensors, {**meta, "adam_step": -1}, "not counts"),
           (tensors, {**meta, "adam_step": True}, "not counts"),
           (tensors[:-1], meta, "do not match"),
           ([*tensors[:-1], torch.zeros(3)], meta, "do not match"),
           ([*tensors[:-1], tensors[-1].double()], meta, "do not match")]
    for t, m, reason in bad:
        assert reason in (joiner._adopt(t, m) or ""), (m, reason)
        assert tensors_hash(joiner._state_tensors()) == seed  # rejected before anything was written
    assert joiner._adopt(tensors, meta) is None
    assert tensors_hash(joiner._state_tensors()) == tensors_hash(source._state_tensors())
    # the next step is the same on both: weights, moments and the step count came across
    for node in (source, joiner):
        node.model.blocks(x).square().mean().backward()
        node.opt.step()
    assert tensors_hash(joiner._state_tensors()) == tensors_hash(source._state_tensors())


def test_a_sole_replica_restarts_from_its_final_checkpoint_or_else_from_the_seed(tmp_path):
    node = _stage_node(tmp_path, "a")
    node.model.blocks(torch.randn(2, 8, 16)).square().mean().backward()
    node.opt.step()
    trained = tensors_hash(node._state_tensors())
    save_checkpoint(node.ckpt_path, node._checkpoint_state())
    again = _stage_node(tmp_path, "a")  # the same id and folder: its restart
    assert again._resume_own() == "checkpoint a.safetensors"
    assert tensors_hash(again._state_tensors()) == trained
    other = _stage_node(tmp_path, "a", stage=2)  # restarted on another stage: not its checkpoint
    seed = tensors_hash(other._state_tensors())
    assert other._resume_own() == "seed" and tensors_hash(other._state_tensors()) == seed
    assert _stage_node(tmp_path, "b")._resume_own() == "seed"  # no checkpoint at all
