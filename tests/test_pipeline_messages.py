"""A pipeline node's checks on what it receives: a malformed plan or task is dropped with a
reason (tests of the pure checks; the swarm tests cover the happy path)."""

from __future__ import annotations

import torch

from loco.node.checkpoint import load_latest, save_checkpoint
from loco.node.config import build_config
from loco.node.pipeline.checkpoints import StageCheckpoints
from loco.node.pipeline.stage_state import StageState
from loco.protocols.pipeline.plan import BWD, DROP, FWD, Iteration, check_plan, check_task
from loco.protocols.state_sync import tensors_hash
from loco.protocols.wire import Message

SHAPE = (2, 8, 16)
PLAN = {"paths": [["a", "b", "c", "a"], ["d", "c", "d"]], "eval": [["a", "b", "c", "a"]],
        "endpoints": {n: f"tcp://127.0.0.1:{i + 1000}" for i, n in enumerate("abcd")},
        "stages": {"a": 0, "b": 1, "c": 2, "d": 0}}


def _msg(kind, tensors=None, sender="b", **meta):
    msg = Message(kind, round=0, meta=meta, tensors=[torch.zeros(SHAPE)] if tensors is None else tensors)
    msg.sender = sender  # (as decode sets it from the signed header)
    return msg


def test_a_good_plan_and_its_tasks_pass():
    assert check_plan(PLAN) is None
    assert check_plan({**PLAN, "joins": {"b": "a", "c": ""}}) is None
    work = Iteration("c", 0, PLAN)
    assert work.todo == 2 + 2 + 1  # middle of mb 0 (fwd + bwd), middle of mb 1, eval forward
    assert check_task(work, _msg(FWD, mb=0, hop=2, eval=False), SHAPE) is None
    assert check_task(work, _msg(BWD, sender="d", mb=1, hop=1, eval=False), SHAPE) is None
    assert check_task(work, _msg(FWD, mb=0, hop=2, eval=True), SHAPE) is None
    assert check_task(work, _msg(DROP, tensors=[], sender="d", mb=1, eval=False), SHAPE) is None


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
        # from a node that is not the hop before (forward) or after (backward): another plan's
        # task, or a forged one (one made it pop a target twice and take the node down)
        (_msg(FWD, sender="d", mb=0, hop=2, eval=False), "comes from b, not d"),
        (_msg(FWD, sender="", mb=0, hop=2, eval=False), "comes from b, not ?"),
        (_msg(BWD, sender="b", mb=1, hop=1, eval=False), "comes from d, not b"),
        (_msg(DROP, tensors=[], sender="a", mb=1, eval=False), "a is not on the path of microbatch 1"),
    ]
    for msg, reason in cases:
        assert reason in (check_task(work, msg, SHAPE) or ""), (msg.meta, check_task(work, msg, SHAPE))
    # pipeline.wire_dtype: tasks travel in that dtype, and only in it
    half = _msg(FWD, [torch.zeros(SHAPE, dtype=torch.bfloat16)], mb=0, hop=2, eval=False)
    assert check_task(work, half, SHAPE, torch.bfloat16) is None
    assert "expected one float32 tensor" in check_task(work, half, SHAPE)
    assert "expected one bfloat16 tensor" in check_task(work, _msg(FWD, mb=0, hop=2, eval=False), SHAPE, torch.bfloat16)


def _stage_state(stage: int = 1) -> StageState:
    """A stage's model and inner optimizer, without the node's network parts."""
    cfg = build_config({"model": {"n_layer": 3, "n_embd": 16, "n_head": 2, "block_size": 8},
                        "pipeline": {"stages": 3, "stage": stage}})
    return StageState(cfg, stage, torch.device("cpu"))


_failures: list = []  # (what a failed checkpoint records: none here)


def _record(kind: str, **fields) -> None:
    _failures.append((kind, fields))


def _checkpoints(tmp_path, name: str) -> StageCheckpoints:
    cfg = build_config({})
    return StageCheckpoints(tmp_path / name / "checkpoint.safetensors", cfg.train, _record)


def test_a_stage_state_hand_off_makes_an_identical_replica_and_a_bad_one_changes_nothing():
    source, joiner = _stage_state(), _stage_state()
    x = torch.randn(2, 8, 16)
    for _ in range(2):  # the source trained: its weights and moments are not the seed's
        source.model.blocks(x).square().mean().backward()
        source.opt.step()
        source.opt.zero_grad()
    tensors, meta = source.snapshot()
    seed = tensors_hash(joiner.tensors())
    bad = [(tensors, {**meta, "stage": 2}, "stage 2"),
           (tensors, {**meta, "adam_step": -1}, "not counts"),
           (tensors, {**meta, "adam_step": True}, "not counts"),
           (tensors[:-1], meta, "do not match"),
           ([*tensors[:-1], torch.zeros(3)], meta, "do not match"),
           ([*tensors[:-1], tensors[-1].double()], meta, "do not match")]
    for t, m, reason in bad:
        assert reason in (joiner.adopt(t, m) or ""), (m, reason)
        assert tensors_hash(joiner.tensors()) == seed  # rejected before anything was written
    assert joiner.adopt(tensors, meta) is None
    assert tensors_hash(joiner.tensors()) == tensors_hash(source.tensors())
    # the next step is the same on both: weights, moments and the step count came across
    for node in (source, joiner):
        node.model.blocks(x).square().mean().backward()
        node.opt.step()
    assert tensors_hash(joiner.tensors()) == tensors_hash(source.tensors())


def test_a_sole_replica_restarts_from_its_final_checkpoint_or_else_from_the_seed(tmp_path):
    state, files = _stage_state(), _checkpoints(tmp_path, "a")
    state.model.blocks(torch.randn(2, 8, 16)).square().mean().backward()
    state.opt.step()
    trained = tensors_hash(state.tensors())
    save_checkpoint(files.path, state.checkpoint(iteration=1))
    again = _stage_state()  # the same node's restart
    assert _checkpoints(tmp_path, "a").resume(again) == "checkpoint checkpoint.safetensors"
    assert tensors_hash(again.tensors()) == trained
    other = _stage_state(stage=2)  # restarted on another stage: not its checkpoint
    seed = tensors_hash(other.tensors())
    assert _checkpoints(tmp_path, "a").resume(other) == "seed" and tensors_hash(other.tensors()) == seed
    assert _checkpoints(tmp_path, "b").resume(_stage_state()) == "seed"  # no checkpoint at all


def test_periodic_checkpoints_follow_the_cadence_and_the_final_one_is_written_on_close(tmp_path):
    cfg = build_config({"train": {"checkpoint_every": 2}})
    state = _stage_state()
    files = StageCheckpoints(tmp_path / "ck.safetensors", cfg.train, _record)
    assert files.periodic(state, 1) == 0.0 and not files.path.exists()  # not due
    files.periodic(state, 2)
    files.close(state, 3)  # the final one (iteration 3) after the periodic one (2)
    again = _stage_state()
    assert files.resume(again).startswith("checkpoint") and tensors_hash(again.tensors()) == tensors_hash(state.tensors())
    assert load_latest(files.path)[0]["iteration"] == 3
    assert not _failures
