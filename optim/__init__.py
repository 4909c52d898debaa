"""The math of local-update training: plain PyTorch over a communicator interface.

- communicator.py  the interfaces optimizers use to reach their group (no sockets here)
- outer.py         the outer Nesterov-SGD step and the result every outer step reports
- diloco.py        DiLoCo: pseudo-gradient, all-reduce, outer SGD
- streaming.py     Streaming DiLoCo: DiLoCo per fragment, staggered, overlapped
- noloco.py        NoLoCo: gossip averaging in random groups with modified momentum
- co2.py           CO2: the all-reduce hidden behind the next round, staleness penalty, clipping
- norms.py         norms every layout of the same numbers computes alike (CO2, clipping)
- background.py    one reduce in flight on a background thread (CO2, Streaming overlap)
- ddp.py           synchronous data parallelism (gradient averaging every step): the baseline
- flat.py          views of one flat buffer shaped like a parameter list

Nothing here imports zmq, hivemind or node; tests drive it with in-process fakes.
"""

from .co2 import CO2, WholeTensors
from .communicator import Communicator, GroupCommunicator, ReduceResult
from .ddp import DataParallel
from .diloco import DiLoCo
from .noloco import NoLoCo
from .outer import OuterStepResult
from .streaming import StreamingDiLoCo, strided_fragments

__all__ = ["CO2", "Communicator", "GroupCommunicator", "ReduceResult", "DataParallel", "DiLoCo", "NoLoCo",
           "OuterStepResult", "StreamingDiLoCo", "WholeTensors", "strided_fragments"]
