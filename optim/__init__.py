"""The math of local-update training: plain PyTorch over a communicator interface.

- communicator.py  the interface optimizers use to reach their group (no sockets here)
- diloco.py        DiLoCo's outer step: pseudo-gradient, averaging, Nesterov outer SGD
- ddp.py           synchronous data parallelism (gradient averaging every step): the baseline
- flat.py          views of one flat buffer shaped like a parameter list

Nothing here imports zmq, hivemind or node; tests drive it with an in-process fake.
"""

from .communicator import Communicator, ReduceResult
from .ddp import DataParallel
from .diloco import DiLoCo, OuterStepResult

__all__ = ["Communicator", "ReduceResult", "DataParallel", "DiLoCo", "OuterStepResult"]
