"""loco: low-communication decentralized training as a library.

Any PyTorch training loop joins a swarm with a ``Swarm`` and one outer algorithm whose
``step()`` it calls after every inner optimizer step (README: "Use loco from your own
training loop")::

    with loco.Swarm(run_id="exp1", join=token) as swarm:  # token: another member's swarm.join_token
        with loco.DiLoCo(model, opt, swarm, inner_steps=500, compression="int4") as outer:
            for x, y in loader:
                loss_fn(model(x), y).backward()
                opt.step(); opt.zero_grad()
                outer.step()

(pyproject.toml maps the package name ``loco`` onto this folder; the daemon, the network
and the math are ``loco.node``, ``loco.protocols`` and ``loco.optim``.)

- swarm.py       ``Swarm``: the DHT node and the ZeroMQ endpoint of this process
- algorithm.py   what every algorithm does alike: steps, rounds, joining, state serving
- adopt.py       adopting a peer's state when behind (catch-up, resync), vouched by others
- outer_step.py  ``DiLoCo``, ``CO2``, ``NoLoCo``: a round ends in one outer step
- inner_sync.py  ``StreamingDiLoCo``, ``DDP``: they synchronize inside a round
- report.py      ``RoundReport``: what a round did (status, bytes, times, weights hash)
- ranks.py       ``Ranks``, ``Follower``: one member made of several torch.distributed ranks
                 (DDP inside, or FSDP: ``ShardedWeights`` gathers the shards at round ends)
- clip.py        ``clip_gradients``: a clip every layout of the gradients computes alike (DDP)
- lgreco_round.py  when a round plans L-GreCo's per-layer compression levels
- token.py       join tokens: the swarm key and a member's address, as one string
- hf.py          ``loco.hf.causal_lm``: a HuggingFace causal LM as a model.factory (the hf extra);
                 ``loco.hf.gpt2_parts``: a GPT-2 cut into pipeline stages
- pipeline_parts.py  ``PipelineParts``: how a model declares its stages for SkipPipe pipelines
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("loco")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The public names load on first use (PEP 562): ``import loco.node.reaper`` and the CLI's
# argument checks must not pay for torch and hivemind.
_PUBLIC = {
    "Swarm": ".swarm", "RoundReport": ".report", "OuterAlgorithm": ".algorithm",
    "DiLoCo": ".outer_step", "CO2": ".outer_step", "NoLoCo": ".outer_step",
    "StreamingDiLoCo": ".inner_sync", "DDP": ".inner_sync", "Ranks": ".ranks", "Follower": ".ranks",
    "PipelineParts": ".pipeline_parts", "clip_gradients": ".clip",
    "Compression": ("loco.node.config", "CompressionConfig"), "LGreCo": ("loco.node.config", "LGrecoConfig"),
    "Timeouts": ("loco.node.config", "CollectiveConfig"), "Network": ("loco.node.config", "NetworkConfig"),
    "Link": ("loco.node.config", "LinkConfig"),
}

__all__ = sorted([*_PUBLIC, "__version__"])


def __getattr__(name: str):
    where = _PUBLIC.get(name)
    if where is None:
        raise AttributeError(f"module 'loco' has no attribute {name!r}")
    module, attr = (where, name) if isinstance(where, str) else where
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from loco.node.config import CollectiveConfig as Timeouts  # noqa: F401
    from loco.node.config import CompressionConfig as Compression  # noqa: F401
    from loco.node.config import LGrecoConfig as LGreCo  # noqa: F401
    from loco.node.config import LinkConfig as Link  # noqa: F401
    from loco.node.config import NetworkConfig as Network  # noqa: F401

    from .algorithm import OuterAlgorithm  # noqa: F401
    from .clip import clip_gradients  # noqa: F401
    from .inner_sync import DDP, StreamingDiLoCo  # noqa: F401
    from .outer_step import CO2, DiLoCo, NoLoCo  # noqa: F401
    from .pipeline_parts import PipelineParts  # noqa: F401
    from .report import RoundReport  # noqa: F401
    from .swarm import Swarm  # noqa: F401
