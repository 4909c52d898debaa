"""HuggingFace causal LMs as loco models: ``model.factory = "loco.hf:causal_lm"``.

Nothing is downloaded: a model comes from a local folder (``save_pretrained`` output,
``local_files_only``) or is built with random weights from a config. Needs the ``hf`` extra
(``pip install 'loco[hf]'``). The daemon reads its output through the one adapter of
loco.node.lm_output (HuggingFace returns ``.logits``), and ``loco export`` writes it back
with ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn


def causal_lm(path: str | None = None, config: dict[str, Any] | None = None) -> nn.Module:
    """``path``: a local model folder; ``config``: a config as a mapping with its
    ``model_type`` (e.g. ``{"model_type": "gpt2", "n_layer": 2, ...}``), built with random
    weights. Exactly one of the two."""
    if (path is None) == (config is None):
        raise ValueError("give exactly one of path (a local model folder) and config (a dict with model_type)")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ImportError("loco.hf needs transformers: pip install 'loco[hf]'") from None
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    settings = dict(config)
    model_type = settings.pop("model_type", None)
    if not model_type:
        raise ValueError("config needs a model_type (e.g. 'gpt2', 'llama')")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings))


def gpt2_parts(model: nn.Module):  # -> loco.PipelineParts
    """A HuggingFace GPT-2 causal LM cut for SkipPipe pipelines (``pipeline.split =
    "loco.hf:gpt2_parts"``): token and position embeddings, the blocks, the final norm and
    the language-model head."""
    from .pipeline_parts import PipelineParts

    body = getattr(model, "transformer", None)
    if body is None or not all(hasattr(body, a) for a in ("wte", "wpe", "h", "ln_f")):
        raise ValueError(f"loco.hf:gpt2_parts: {type(model).__name__} is not a GPT-2 causal LM "
                         f"(no transformer.wte/wpe/h/ln_f)")
    return PipelineParts(_GPT2Embed(body), [_FirstOutput(b) for b in body.h], nn.Sequential(body.ln_f, model.lm_head))


class _GPT2Embed(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = body.wte, body.wpe, body.drop

    def forward(self, idx):
        import torch

        return self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))


class _FirstOutput(nn.Module):
    """A HuggingFace block returns a tuple (hidden states first) in some versions."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        out = self.block(x)
        return out[0] if isinstance(out, tuple) else out
