"""What reaches a pipeline node, sorted by what its loop waits for: the plans of iterations
to come, the microbatch tasks of the iteration at hand (those of later iterations kept
until it gets there, those of earlier ones dropped), the stage state handed to it as it
joins, the leader's final validation and auto_assign's placement.

The transport's I/O thread only queues (``put``, a bounded queue: past its size a message
is dropped and counted by the transport); the node's loop sorts as it reads (``pull``), so
every buffer below is touched by one thread only.
"""

from __future__ import annotations

import queue
from collections import defaultdict

from ..transport import Transport
from ..wire import Message
from .plan import ASSIGN, FINAL, HANDOFF, PLAN, QUEUED


class Channel:
    def __init__(self, max_queued: int = 10_000):
        self._inbox: queue.Queue[Message] = queue.Queue(maxsize=max_queued)
        self._later: dict[int, list[Message]] = defaultdict(list)  # tasks of iterations ahead
        self.plans: dict[int, Message] = {}  # iteration -> the first plan that came for it
        self.taken = -1  # the last iteration whose plan the node took: copies of it and earlier are stale
        self._filed: dict[str, list[Message]] = {FINAL: [], ASSIGN: [], HANDOFF: []}

    def attach(self, transport: Transport) -> None:
        """Queue the pipeline's messages that ``transport`` receives (full: dropped, counted)."""
        for kind in QUEUED:
            transport.on(kind, self._inbox.put_nowait)

    def put(self, msg: Message) -> None:
        """A message this node sends itself (the leader's own plan)."""
        self._inbox.put(msg)

    def pull(self, it: int, timeout: float) -> Message | None:
        """The next task of iteration ``it`` (FWD/BWD/DROP), waiting up to ``timeout``;
        what else arrives meanwhile is filed (plans, later iterations' tasks, hand-offs,
        final validation, placement), tasks of earlier iterations dropped."""
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if msg.kind == PLAN:
            if msg.round > self.taken:  # (a resent copy of one taken already is stale)
                self.plans.setdefault(msg.round, msg)  # the first plan of an iteration wins
            return None
        if msg.kind in self._filed:
            self._filed[msg.kind].append(msg)
            return None
        if msg.round > it:
            self._later[msg.round].append(msg)
            return None
        return msg if msg.round == it else None

    def keep_for(self, it: int, msg: Message) -> None:
        """A task of iteration ``it`` that came before its plan."""
        self._later[it].append(msg)

    def start(self, it: int) -> None:
        """Iteration ``it`` begins: the tasks kept for it are read again."""
        for pending in self._later.pop(it, []):
            self._inbox.put(pending)

    def forget_before(self, it: int) -> None:
        """This node takes part from iteration ``it`` on: tasks kept for earlier ones go."""
        self._later = defaultdict(list, {k: v for k, v in self._later.items() if k >= it})

    def take_plan(self, it: int) -> Message | None:
        return self.plans.pop(it, None)

    def next_filed(self, kind: str) -> Message | None:
        """The oldest filed message of ``kind`` (FINAL, ASSIGN, HANDOFF), or None."""
        filed = self._filed[kind]
        return filed.pop(0) if filed else None
