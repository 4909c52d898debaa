"""How a model declares its pipeline stages (SkipPipe pipelines, ``pipeline.stages``).

A model is cut into three kinds of part::

    embed    token ids [B, T] -> hidden states [B, T, C]      (on stage 0)
    blocks   hidden states -> hidden states of the same shape  (cut into stages, in order)
    head     hidden states -> logits [B, T, V]                 (on stage 0, with the loss)

Stage 0 holds the embedding, the head and the first group of blocks; every other stage a
contiguous group of blocks. A microbatch that skips a stage passes its blocks by on the
residual stream, so blocks must map hidden states to hidden states of the same shape.

A model declares its parts with a ``pipeline_parts()`` method that returns
:class:`PipelineParts` (the built-in GPT does), or ``pipeline.split`` names a function
``module:callable`` that takes the model and returns them (``loco.hf:gpt2_parts`` does
for HuggingFace GPT-2 models). The parts must be the model's own modules, not copies:
their parameters are the model's, and checkpoints keep the model's parameter names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class PipelineParts:
    embed: nn.Module
    blocks: Sequence[nn.Module]
    head: nn.Module


def pipeline_parts(model: nn.Module, split: str | None = None) -> PipelineParts:
    """``model``'s parts: from ``split`` ('module:callable') if given, else from its
    ``pipeline_parts()``. ValueError (one line) if neither declares them or they are not
    parts of the model."""
    if split:
        parts = _load(split)(model)
    elif callable(getattr(model, "pipeline_parts", None)):
        parts = model.pipeline_parts()
    else:
        raise ValueError(f"{type(model).__name__} does not declare its pipeline stages: give it a pipeline_parts() "
                         f"method returning loco.PipelineParts, or set pipeline.split (README, Pipelines)")
    if not isinstance(parts, PipelineParts):
        raise ValueError(f"the pipeline split of {type(model).__name__} returned {type(parts).__name__}, "
                         f"not loco.PipelineParts")
    if not parts.blocks:
        raise ValueError(f"the pipeline split of {type(model).__name__} has no blocks")
    # a part is the model's own module, or a wrapper around the model's own parameters (an
    # embedding that adds positions)
    own = {id(m) for m in model.modules()}
    params = {id(p) for p in model.parameters()}
    for name, module in [("embed", parts.embed), ("head", parts.head), *(("a block", b) for b in parts.blocks)]:
        if not isinstance(module, nn.Module):
            raise ValueError(f"pipeline parts: {name} is {type(module).__name__}, not an nn.Module")
        if id(module) not in own and not all(id(p) in params for p in module.parameters()):
            raise ValueError(f"pipeline parts: {name} ({type(module).__name__}) is not part of the model")
    return parts


def _load(split: str) -> Callable[[nn.Module], PipelineParts]:
    module_name, sep, attr = split.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"pipeline.split: expected 'module:callable', got {split!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"pipeline.split: cannot load {split!r}: {exc}") from None
