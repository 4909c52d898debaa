"""The one adapter between a language model's forward and the trainer's loss.

The contract (README, Models): ``model(idx[B, T])`` returns logits ``[B, T, V]`` as a
tensor, as the first item of a tuple, or as the ``.logits`` of an output object (what
HuggingFace causal LMs return) or under a ``logits`` key. With ``model.computes_loss`` the trainer instead calls
``model(idx, labels=idx)`` and takes the loss the model returns (a scalar tensor, the
first item of a tuple, or ``.loss``): the model shifts the labels itself, as HuggingFace
causal LMs do. The vocabulary is the size of the model's input embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class ModelOutputError(TypeError):
    """The model returned something the contract does not cover (the message says what)."""


def _tensor_in(output: Any, attr: str, fits: Callable[[torch.Tensor], bool], expected: str) -> torch.Tensor:
    """The tensor the forward returned as itself, first in a tuple, or under ``attr``
    (attribute or key); ModelOutputError unless ``fits`` it."""
    if isinstance(output, torch.Tensor):
        value = output
    elif isinstance(output, (tuple, list)) and output:
        value = output[0]
    else:
        value = output.get(attr) if isinstance(output, Mapping) else getattr(output, attr, None)
        if value is None:
            raise ModelOutputError(f"the model returned {type(output).__name__}: expected a tensor, a tuple whose "
                                   f"first item is one, or an object or mapping with .{attr}")
    if not isinstance(value, torch.Tensor) or not fits(value):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ModelOutputError(f"the model's {attr} is {shape}, expected {expected}")
    return value


def logits_of(output: Any) -> torch.Tensor:
    """Logits [B, T, V] from whatever the forward returned."""
    return _tensor_in(output, "logits", lambda t: t.dim() == 3, "a [batch, time, vocab] tensor")


def loss_of(output: Any) -> torch.Tensor:
    """The scalar loss a model computed itself (``model.computes_loss``)."""
    return _tensor_in(output, "loss", lambda t: t.numel() == 1, "a scalar tensor").reshape(())


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, computes_loss: bool) -> torch.Tensor:
    """Mean next-token cross-entropy of the window ``x`` (``y``: ``x`` shifted by one)."""
    if computes_loss:
        return loss_of(model(x, labels=x)).float()
    logits = logits_of(model(x))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the model's input embedding (``get_input_embeddings()`` where the model has
    it, as HuggingFace models do, else its first ``nn.Embedding``)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise ModelOutputError("the model has no nn.Embedding: its vocabulary size is unknown "
                               "(give it get_input_embeddings())")
    return int(embedding.num_embeddings)
