"""``loco export RUN_DIR --out DIR``: a run's trained weights as a model folder that loads
without loco.

- the built-in GPT is written as a HuggingFace GPT-2 model (``config.json`` +
  ``model.safetensors``): its architecture is GPT-2's with exact GELU, so
  ``GPT2LMHeadModel.from_pretrained(DIR)`` (or ``AutoModelForCausalLM``) computes the same
  logits; writing it needs neither transformers nor loco's classes;
- a HuggingFace model (``loco.hf:causal_lm``) is written with its own ``save_pretrained``;
- any other factory's model as ``model.safetensors`` (its ``state_dict``) plus the factory
  and kwargs that build it.

The weights come from the furthest checkpoint of the run (highest round; the smallest node
id among equals): after a round's outer step every member of a synchronous algorithm holds
the same weights. A pipeline run's stages are put back together into one GPT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file, save_model

from .checkpoint import SUFFIX, CheckpointError, checkpoint_summary, load_checkpoint
from .config import Config, ConfigError, ModelConfig, build_config
from .model import GPT, build_model
from .shard_files import assemble_model


@dataclass(frozen=True)
class Exported:
    out: Path
    kind: str  # "gpt2" | "huggingface" | "state_dict"
    node: str
    round: int


def _node_config(run: Path, node: str) -> Config:
    path = run / "config" / f"{node}.json"
    if not path.exists():
        raise ConfigError(f"export: {path} is missing (the resolved config each node writes)")
    return build_config(json.loads(path.read_text()), f"{node}'s config")


def _checkpoints(run: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(node, file, state without its tensors) of every checkpoint of the run."""
    folder = run / "checkpoints"
    found = []
    for path in sorted(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []:
        try:
            found.append((path.name[: -len(SUFFIX)], path, checkpoint_summary(path)))
        except CheckpointError as exc:
            raise ConfigError(f"export: {exc}") from None
    if not found:
        raise ConfigError(f"export: {folder} holds no checkpoints ({'*' + SUFFIX}); is {run} a run's --out?")
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        raise ConfigError(f"export: {exc}") from None


def _gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None}


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The built-in GPT's weights under GPT-2's names (HuggingFace's Conv1D layers hold
    the transpose of a Linear's weight; the head is tied to the embedding, so not stored)."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["tok.weight"], "transformer.wpe.weight": sd["pos.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
    names = {"ln1": "ln_1", "ln2": "ln_2", "qkv": "attn.c_attn", "proj": "attn.c_proj", "mlp.0": "mlp.c_fc",
             "mlp.2": "mlp.c_proj"}
    for i in range(len(model.blocks)):
        for ours, theirs in names.items():
            weight, bias = sd[f"blocks.{i}.{ours}.weight"], sd[f"blocks.{i}.{ours}.bias"]
            is_linear = not ours.startswith("ln")
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t().contiguous() if is_linear else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = bias
    return {k: v.contiguous().clone() for k, v in out.items()}


def _model_of(run: Path, found: list[tuple[str, Path, dict[str, Any]]]) -> tuple[torch.nn.Module, Config, str, int]:
    """Only the checkpoints used are read whole: one, or one per pipeline stage."""
    pipeline = [(n, p, s) for n, p, s in found if s.get("pipeline")]
    if pipeline:
        from .stages import assemble

        per_stage: dict[int, tuple[str, Path, dict[str, Any]]] = {}
        for entry in pipeline:
            per_stage.setdefault(int(entry[2]["pipeline"]["stage"]), entry)
        stages = int(pipeline[0][2]["pipeline"]["stages"])
        missing = sorted(set(range(stages)) - set(per_stage))
        if missing:
            raise ConfigError(f"export: no checkpoint of pipeline stage(s) {missing} in {run / 'checkpoints'}")
        node = per_stage[0][0]
        cfg = _node_config(run, node)
        model = assemble(cfg.model, [_load(per_stage[s][1])["model"] for s in range(stages)])
        return model, cfg, node, min(int(e[2]["iteration"]) for e in per_stage.values())
    node, path, summary = min(found, key=lambda item: (-int(item[2].get("round", 0)), item[0]))
    cfg = _node_config(run, node)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    state = _load(path)
    if "shards" in state["trainer"]:  # a sharded node's: every rank's pieces, put together
        try:
            weights = assemble_model(path, state)
        except CheckpointError as exc:
            raise ConfigError(f"export: {exc}") from None
    else:
        weights = state["trainer"]["model"]
    model.load_state_dict(weights)
    return model, cfg, node, int(summary.get("round", 0))


def export_run(run: Path, out: Path) -> Exported:
    """Write ``run``'s furthest weights to ``out`` (see the module docstring)."""
    if not run.is_dir():
        raise ConfigError(f"export: {run} is not a folder")
    model, cfg, node, round_ = _model_of(run, _checkpoints(run))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, GPT):
        save_file(gpt2_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(_gpt2_config(cfg.model), indent=2) + "\n")
        kind = "gpt2"
    elif callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained(str(out))
        kind = "huggingface"
    else:
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        kind = "state_dict"
    provenance = {"run": str(run.resolve()), "node": node, "round": round_, "kind": kind,
                  "factory": cfg.model.factory, "kwargs": cfg.model.kwargs}
    (out / "loco_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return Exported(out, kind, node, round_)
