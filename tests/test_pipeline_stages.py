"""Stage models against the whole GPT: cutting the model into stages must not change its
math, and the stages' checkpoints must put the whole model back together."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loco.node.config import ModelConfig
from loco.node.model import GPT
from loco.node.stages import StageModel, assemble, loss_skipping, stage_blocks

CFG = ModelConfig(n_layer=5, n_head=2, n_embd=16, block_size=8)


def test_stage_blocks_are_contiguous_and_cover_every_block():
    for n_layer in range(1, 12):
        for stages in range(1, n_layer + 1):
            groups = stage_blocks(n_layer, stages)
            assert [b for g in groups for b in g] == list(range(n_layer))
            sizes = [len(g) for g in groups]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
            assert sizes[0] == min(sizes)  # stage 0 also runs the embedding and the head


def _stages(n: int) -> list[StageModel]:
    return [StageModel(CFG, s, n, seed=3) for s in range(n)]


def _whole() -> GPT:
    torch.manual_seed(3)
    return GPT(CFG)


def test_a_full_path_through_the_stages_is_the_whole_model_forward_and_backward():
    stages = _stages(3)
    gpt = _whole()
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    # the pipeline's way: each hop gets a detached activation and returns its gradient
    h0 = stages[0].embed(x)
    a1 = h0.detach().requires_grad_()
    h1 = stages[1].blocks(a1)
    a2 = h1.detach().requires_grad_()
    h2 = stages[2].blocks(a2)
    a3 = h2.detach().requires_grad_()
    loss = stages[0].loss(a3, y)
    loss.backward()
    h2.backward(a3.grad)
    h1.backward(a2.grad)
    h0.backward(a1.grad)
    ref = F.cross_entropy(gpt(x).reshape(-1, 256), y.reshape(-1))
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    grads = {}
    for st in stages:
        for name, p in st.named_parameters():
            grads[name] = p.grad
    for name, p in gpt.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name


def test_a_skipped_stage_gets_no_gradient():
    stages = _stages(3)
    x = torch.randint(0, 256, (2, 8))
    h0 = stages[0].embed(x)
    a2 = h0.detach().requires_grad_()
    h2 = stages[2].blocks(a2)  # stage 1 skipped
    a3 = h2.detach().requires_grad_()
    stages[0].loss(a3, x).backward()
    h2.backward(a3.grad)
    h0.backward(a2.grad)
    assert all(p.grad is None for p in stages[1].params)
    assert all(p.grad is not None for p in stages[2].params)


def test_stage_states_assemble_into_the_whole_model_and_skipping_matches_the_path():
    stages = _stages(3)
    model = assemble(CFG, [s.state_dict() for s in stages])
    ref = _whole()
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        path = stages[0].loss(stages[2].blocks(stages[0].embed(x)), y)
    skipped = loss_skipping(model.pipeline_parts(), [(x, y)], set(stage_blocks(CFG.n_layer, 3)[1]))
    assert skipped == pytest.approx(float(path), abs=1e-6)
    with pytest.raises(ValueError, match="missing"):
        assemble(CFG, [stages[0].state_dict(), stages[2].state_dict()])


HF_GPT2 = ModelConfig(factory="loco.hf:causal_lm", block_size=8, kwargs={"config": {
    "model_type": "gpt2", "n_layer": 3, "n_head": 2, "n_embd": 16, "n_positions": 8, "vocab_size": 256,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}})


def test_a_huggingface_gpt2_cut_into_stages_is_the_whole_model():
    """A model.factory model with a split function (loco.hf:gpt2_parts): the stages' path
    is the HuggingFace forward, their gradients its gradients, their states its state."""
    pytest.importorskip("transformers")
    from loco.node.model import build_model

    stages = [StageModel(HF_GPT2, s, 3, seed=5, split="loco.hf:gpt2_parts") for s in range(3)]
    torch.manual_seed(5)
    whole = build_model(HF_GPT2)
    x = torch.randint(0, 256, (2, 8))
    h0 = stages[0].embed(x)
    a1 = h0.detach().requires_grad_()
    h1 = stages[1].blocks(a1)
    a2 = h1.detach().requires_grad_()
    h2 = stages[2].blocks(a2)
    a3 = h2.detach().requires_grad_()
    loss = stages[0].loss(a3, x)
    loss.backward()
    h2.backward(a3.grad)
    h1.backward(a2.grad)
    h0.backward(a1.grad)
    ref = F.cross_entropy(whole(x).logits.reshape(-1, 256), x.reshape(-1))
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    grads = {name: p.grad for st in stages for name, p in st.named_parameters()}
    for name, p in whole.named_parameters():
        assert torch.allclose(grads[name], p.grad, atol=1e-6), name
    assert stages[1].width == 16 and [len(s.params) > 0 for s in stages] == [True] * 3
    rebuilt = assemble(HF_GPT2, [s.state_dict() for s in stages])
    for (n1, p1), (n2, p2) in zip(rebuilt.state_dict().items(), whole.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_a_model_that_declares_no_stages_is_named():
    from loco.node.config import ConfigError

    plain = ModelConfig(factory="torch.nn:Linear", kwargs={"in_features": 4, "out_features": 4})
    with pytest.raises(ConfigError, match="Linear does not declare its pipeline stages"):
        StageModel(plain, 0, 2, seed=0)
    with pytest.raises(ConfigError, match="pipeline.split: cannot load"):
        StageModel(CFG, 0, 2, seed=0, split="loco.hf:no_such_split")
    with pytest.raises(ConfigError, match="exceeds the model's 5 blocks"):
        StageModel(CFG, 0, 6, seed=0)
