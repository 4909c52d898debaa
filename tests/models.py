"""User-style model factories for tests of model.factory and the output contract."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


class TinyLM(torch.nn.Module):
    """``returns``: what forward hands back: the logits tensor, a tuple (logits, extra), an
    object with .logits, or the loss it computes itself from ``labels``."""

    def __init__(self, vocab: int = 256, width: int = 16, returns: str = "tensor") -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)
        self.returns = returns

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.out(self.emb(idx))
        if self.returns == "tuple":
            return logits, None
        if self.returns == "object":
            return SimpleNamespace(logits=logits)
        if self.returns == "loss":
            assert labels is not None, "computes_loss: the trainer passes labels"
            # the HuggingFace convention: the model shifts the labels itself
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            return SimpleNamespace(loss=loss, logits=logits)
        if self.returns == "none":  # a forward that forgot to return
            return None
        if self.returns == "dict":
            return {"logits": logits}
        return logits


def tiny_lm(vocab: int = 256, width: int = 16, returns: str = "tensor") -> torch.nn.Module:
    return TinyLM(vocab, width, returns)


def tiny_lm_with_context(context: int = 32) -> torch.nn.Module:
    """A model that declares its own context length (``block_size``), as nanoGPT-style ones do."""
    model = TinyLM()
    model.block_size = context
    return model


def not_a_model() -> object:
    return object()


def needs_a_file(path: str) -> torch.nn.Module:
    with open(path) as f:  # OSError for a missing file: the factory failing
        f.read()
    return TinyLM()
