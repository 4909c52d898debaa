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
