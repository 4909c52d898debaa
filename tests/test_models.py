"""Models: built-in GPT presets, user factories with kwargs, and the output contract."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from loco.node.config import ConfigError, ModelConfig, build_config, config_to_dict
from loco.node.lm_output import ModelOutputError, logits_of, loss_of, vocab_size_of
from loco.node.model import GPT, build_model, unique_parameters
from loco.node.trainer import Trainer


def _param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory for 124M parameters
        return sum(p.numel() for p in unique_parameters(GPT(cfg)))


def test_presets_set_the_documented_shapes_and_explicit_keys_win():
    assert _param_count(ModelConfig(preset="tiny")) == _param_count(ModelConfig())
    gpt2 = ModelConfig(preset="gpt2-124m")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.block_size, gpt2.vocab_size) == (12, 12, 768, 1024, 50257)
    assert _param_count(gpt2) == 124_439_808  # GPT-2 small, tied embedding and head
    small = ModelConfig(preset="small")
    assert (small.n_layer, small.n_embd, small.block_size) == (6, 384, 256)
    assert 10_000_000 < _param_count(small) < 11_500_000
    shorter = build_config({"model": {"preset": "small", "block_size": 64}}).model
    assert shorter.block_size == 64 and shorter.n_layer == 6
    with pytest.raises(ConfigError, match="model.preset"):
        build_config({"model": {"preset": "huge"}})


def test_factory_receives_kwargs_and_its_vocabulary_is_the_models():
    model = build_model(ModelConfig(factory="tests.models:tiny_lm", kwargs={"vocab": 1000, "width": 8}))
    assert vocab_size_of(model) == 1000
    assert model(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 1000)
    assert vocab_size_of(build_model(ModelConfig(vocab_size=512, n_embd=16, n_head=2))) == 512


@pytest.mark.parametrize(("model", "match"), [
    ({"factory": "tests.models:tiny_lm", "kwargs": {"colour": "red"}}, r"^model\.kwargs: .*colour"),
    ({"factory": "tests.models:needs_a_file", "kwargs": {"path": "/nonexistent/x"}},
     r"^model\.factory: tests.models:needs_a_file\(\*\*model.kwargs\) failed: FileNotFoundError"),
    ({"factory": "tests.models:not_a_model"}, r"^model\.factory: .*returned object, not nn.Module"),
    ({"factory": "tests.models"}, r"^model\.factory: expected 'module:callable'"),
    ({"factory": "tests.models:missing"}, r"^model\.factory: cannot load"),
])
def test_factory_errors_are_one_line_and_name_the_key(model, match):
    with pytest.raises(ConfigError, match=match) as err:
        build_model(ModelConfig(**model))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("model", "match"), [
    ({"kwargs": {"vocab": 3}}, "model.kwargs are passed to model.factory, which is unset"),
    ({"factory": "tests.models:tiny_lm", "n_layer": 4}, "model.n_layer"),
    ({"factory": "tests.models:tiny_lm", "preset": "small"}, "model.preset"),
    ({"computes_loss": True}, "model.computes_loss needs model.factory"),
])
def test_keys_that_would_be_ignored_are_rejected(model, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"model": model})


def test_output_adapter_takes_tensors_tuples_objects_and_mappings():
    logits = torch.randn(2, 3, 7)
    for out in (logits, (logits, None), [logits], SimpleNamespace(logits=logits), {"logits": logits}):
        assert logits_of(out) is logits
    loss = torch.tensor(1.5)
    for out in (loss, (loss, logits), SimpleNamespace(loss=loss), {"loss": loss}):
        assert float(loss_of(out)) == 1.5
    with pytest.raises(ModelOutputError, match="returned str"):
        logits_of("nope")
    with pytest.raises(ModelOutputError, match=r"logits is \(2, 7\)"):
        logits_of(torch.randn(2, 7))
    with pytest.raises(ModelOutputError, match="loss is"):
        loss_of(torch.randn(4))


def _trainer(tmp_path, model: dict, vocab: int = 256, tokens: int = 20_000) -> Trainer:
    ids = (np.arange(tokens) * 7919 % vocab).astype(np.uint16 if vocab <= 65536 else np.uint32)
    np.save(tmp_path / "tokens.npy", ids)
    cfg = build_config({"model": {"block_size": 16, **model},
                        "data": {"path": str(tmp_path / "tokens.npy"), "batch_size": 4, "val_batches": 1},
                        "optim": {"inner_lr": 1e-2, "warmup_steps": 0}})
    return Trainer(cfg, "node0")


@pytest.mark.parametrize("returns", ["tensor", "tuple", "object", "dict", "loss"])
def test_trainer_learns_through_every_output_form(tmp_path, returns):
    trainer = _trainer(tmp_path, {"factory": "tests.models:tiny_lm", "computes_loss": returns == "loss",
                                  "kwargs": {"vocab": 300, "returns": returns}}, vocab=300)
    before = trainer.evaluate()
    for _ in range(30):
        trainer.train_step()
    assert trainer.evaluate() < before - 0.5  # a periodic sequence: quickly learnt


def test_data_outside_the_models_vocabulary_and_a_broken_forward_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^data: token id 299 is outside the model's vocabulary of 256"):
        _trainer(tmp_path, {"factory": "tests.models:tiny_lm"}, vocab=300)
    with pytest.raises(ConfigError, match=r"^model: the model returned NoneType") as err:
        _trainer(tmp_path, {"factory": "tests.models:tiny_lm", "kwargs": {"returns": "none"}})
    assert "\n" not in str(err.value)
    big = _trainer(tmp_path, {"preset": "tiny", "vocab_size": 70_000, "n_embd": 16, "n_head": 2}, vocab=70_000)
    assert big.vocab_size == 70_000


def test_a_models_own_context_length_is_used_and_a_contradicting_key_is_an_error(tmp_path):
    np.save(tmp_path / "tokens.npy", (np.arange(20_000) % 256).astype(np.uint16))
    data = {"path": str(tmp_path / "tokens.npy"), "batch_size": 4, "val_batches": 1}
    model = {"factory": "tests.models:tiny_lm_with_context", "kwargs": {"context": 32}}
    trainer = Trainer(build_config({"model": model, "data": data}), "node0")
    assert trainer.block_size == 32 and trainer.sampler.next_batch()[0].shape[-1] == 32
    assert Trainer(build_config({"model": {**model, "block_size": 32}, "data": data}), "node0").block_size == 32
    # as a node of `loco swarm` reads it: every field written out, the default block_size among them
    assert Trainer(build_config(config_to_dict(build_config({"model": model, "data": data}))), "node0").block_size == 32
    with pytest.raises(ConfigError, match=r"^model.block_size = 16, but the model built by model.factory has "
                                          r"block_size = 32"):
        Trainer(build_config({"model": {**model, "block_size": 16}, "data": data}), "node0")


def test_the_daemon_stops_at_start_with_one_line_that_names_the_key(tmp_path):
    import signal

    from click.testing import CliRunner

    from loco.node.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # (in this process: `node start` installs its stop handlers)
        result = CliRunner().invoke(main, ["node", "start", "--out", str(tmp_path / "run"), "--set",
                                           "swarm.insecure=true", "--set", "model.factory=tests.models:tiny_lm",
                                           "--set", 'model.kwargs={colour="red"}'])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: model.kwargs: tests.models:tiny_lm does not "
                                                             "accept {'colour': 'red'}"), result.output
    assert "Traceback" not in result.output


def test_a_compiled_inner_loop_follows_the_eager_one(tmp_path):
    """train.compile = true on the CPU: the same losses as eager (the compiled kernels
    reorder float sums: up to a small tolerance) from the same weights and batches."""
    pytest.importorskip("torch._inductor")
    np.save(tmp_path / "tokens.npy", (np.arange(20_000) % 256).astype(np.uint16))
    losses = {}
    for compiled in (False, True):
        cfg = build_config({"model": {"preset": "tiny", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 16},
                            "data": {"path": str(tmp_path / "tokens.npy"), "batch_size": 4, "val_batches": 1},
                            "optim": {"warmup_steps": 0}, "train": {"compile": compiled}})
        trainer = Trainer(cfg, "node0")
        assert trainer.compiled is compiled
        losses[compiled] = [trainer.train_step() for _ in range(4)]
        assert not any(k.startswith("_orig_mod") for k in trainer.state_dict()["model"])  # names as eager's
    assert losses[True] == pytest.approx(losses[False], rel=1e-4), losses
