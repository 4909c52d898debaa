"""The built-in model (a GPT, byte-level by default) and loading a user's model factory."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Collection, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, ModelConfig


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, C]
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer. forward(idx[B, T]) -> logits[B, T, vocab_size]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.block_size = cfg.block_size
        self.tok = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, skip: Collection[int] = ()) -> torch.Tensor:
        """``skip``: blocks the residual stream passes by (evaluating a pipeline-trained
        model with stages left out)."""
        T = idx.shape[1]
        if self.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size {self.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for i, block in enumerate(self.blocks):
            if i not in skip:
                x = block(x)
        return self.head(self.ln_f(x))


    def pipeline_parts(self):  # -> loco.PipelineParts
        """The embedding (tokens and positions), the blocks and the head (final norm and the
        tied projection), for SkipPipe pipelines."""
        from loco.pipeline_parts import PipelineParts

        return PipelineParts(_Embed(self.tok, self.pos), list(self.blocks), nn.Sequential(self.ln_f, self.head))


class _Embed(nn.Module):
    """Token plus position embedding: a pipeline's first part (it shares GPT's modules)."""

    def __init__(self, tok: nn.Embedding, pos: nn.Embedding):
        super().__init__()
        self.tok, self.pos = tok, pos

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


def build_model(cfg: ModelConfig) -> nn.Module:
    """The built-in GPT, or ``cfg.factory`` ('module:callable') called with ``cfg.kwargs``.
    ConfigError (one line naming the key) for a factory that cannot be loaded, rejects its
    kwargs, fails, or returns something that is not an nn.Module."""
    if not cfg.factory:
        return GPT(cfg)
    module_name, sep, attr = cfg.factory.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"model.factory: expected 'module:callable', got {cfg.factory!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.factory: cannot load {cfg.factory!r}: {exc}") from exc
    try:
        inspect.signature(factory).bind(**cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"model.kwargs: {cfg.factory} does not accept {dict(cfg.kwargs)!r} ({exc})") from None
    except ValueError:  # no signature to check (a builtin): the call below tells
        pass
    try:
        model = factory(**cfg.kwargs)
    except (ImportError, OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConfigError(f"model.factory: {cfg.factory}(**model.kwargs) failed: {type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory: {cfg.factory!r} returned {type(model).__name__}, not nn.Module")
    return model


def unique_parameters(model: nn.Module | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Parameters in a fixed order, each once (tied weights appear once)."""
    params = model.parameters() if isinstance(model, nn.Module) else model
    return list(dict.fromkeys(params))
