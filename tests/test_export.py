"""loco export on run folders laid out as the daemon writes them (config + checkpoints)."""

from __future__ import annotations

import json

import pytest
import torch

from loco.node.checkpoint import checkpoint_file, save_checkpoint
from loco.node.config import ConfigError, build_config, config_to_dict
from loco.node.export import export_run
from loco.node.trainer import Trainer


def _run_folder(tmp_path, model: dict, rounds: dict[str, int]) -> dict[str, Trainer]:
    """One trainer per node, trained ``rounds[node]`` steps, checkpointed at that round."""
    run = tmp_path / "run"
    trainers = {}
    for node, r in rounds.items():
        cfg = build_config({"model": model, "data": {"max_bytes": 200_000, "batch_size": 2, "val_batches": 1}})
        (run / "config").mkdir(parents=True, exist_ok=True)
        (run / "config" / f"{node}.json").write_text(json.dumps(config_to_dict(cfg)))
        t = Trainer(cfg, node)
        for _ in range(r):
            t.train_step()
        save_checkpoint(checkpoint_file(run / "checkpoints", node), {"trainer": t.state_dict(), "round": r,
                                                                     "algorithm": "diloco"})
        trainers[node] = t
    return trainers


def test_the_builtin_gpt_exports_as_gpt2_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    trainers = _run_folder(tmp_path, {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 16, "vocab_size": 300},
                           {"node0": 2, "node1": 3})
    made = export_run(tmp_path / "run", tmp_path / "model")
    assert (made.kind, made.node, made.round) == ("gpt2", "node1", 3)  # the furthest checkpoint
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), local_files_only=True).eval()
    ours = trainers["node1"].model.eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5)
    provenance = json.loads((tmp_path / "model" / "loco_export.json").read_text())
    assert provenance["node"] == "node1" and provenance["round"] == 3


def test_a_factory_model_exports_as_safetensors_and_errors_are_one_line(tmp_path):
    from safetensors.torch import load_file

    from tests.models import TinyLM

    trainers = _run_folder(tmp_path, {"factory": "tests.models:tiny_lm", "kwargs": {"width": 8}}, {"node0": 2})
    made = export_run(tmp_path / "run", tmp_path / "model")
    assert made.kind == "state_dict"
    fresh = TinyLM(width=8)
    fresh.load_state_dict(load_file(str(tmp_path / "model" / "model.safetensors")))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 trainers["node0"].model.state_dict().values(), strict=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^export: .*empty/checkpoints holds no checkpoints") as err:
        export_run(tmp_path / "empty", tmp_path / "x")
    assert "\n" not in str(err.value)
