"""This node's part of one iteration: the microbatches it starts (stage 0: draw a batch,
embed it, send it down its path; at the end of the path the loss and its backward pass),
the forward passes of its blocks on the activations that arrive (at most ``memory``
microbatches held for their backward pass; later ones wait), the backward passes, and
giving a microbatch up (a node on its path died, or the iteration's deadline passed) on
every node that still waits for it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loco.protocols.membership import PeerInfo
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import BWD, DROP, FWD, REJOINING, Iteration, check_task
from loco.protocols.wire import Message

from ..config import Config
from ..data import Sampler
from .post import Post
from .stage_state import StageState

log = logging.getLogger("loco.node.pipeline")


@dataclass(frozen=True)
class Activations:
    """What travels between stages: one microbatch's hidden states [B, T, width] (or their
    gradient), in the wire dtype (``pipeline.wire_dtype``)."""

    shape: tuple[int, int, int]
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, cfg: Config, width: int) -> Activations:
        return cls((cfg.data.batch_size, cfg.model.block_size, width), getattr(torch, cfg.pipeline.wire_dtype))

    @property
    def bytes(self) -> int:
        b, t, c = self.shape
        return b * t * c * self.dtype.itemsize


class StageCompute:
    def __init__(self, cfg: Config, state: StageState, sampler: Sampler,
                 val: list[tuple[torch.Tensor, torch.Tensor]], channel: Channel, post: Post, stop: threading.Event):
        self.p, self.state, self.model, self.device = cfg.pipeline, state, state.model, state.device
        self.sampler, self.val, self.channel, self.post, self.stop = sampler, val, channel, post, stop
        self.wire = Activations.of(cfg, state.model.width)

    def run(self, work: Iteration, watch: Callable[[], list[PeerInfo]]) -> tuple[float, float]:
        """Do this node's part of ``work``; returns (compute s, waiting s). ``watch()`` is
        called about every second while waiting (the DHT has no change notification): it
        returns the live roster, and microbatches on a path through a node not in it are
        given up."""
        self.model.train()
        self.channel.start(work.number)
        deadline = time.monotonic() + self.p.iteration_timeout_s
        next_check = time.monotonic() + 1.0
        compute = waited = 0.0
        while work.todo > 0 and not self.stop.is_set():
            t0 = time.monotonic()
            while work.launch and (work.launch[0][1] or self._memory_free(work)):
                m, is_eval = work.launch.pop(0)
                self._launch(work, m, is_eval)
            while work.deferred and self._memory_free(work):
                self._forward(work, work.deferred.pop(0))
            compute += time.monotonic() - t0
            if work.todo <= 0:
                break
            now = time.monotonic()
            if now >= deadline:
                for m, is_eval in list(work.remaining):
                    self.abandon(work, m, is_eval, f"not done {self.p.iteration_timeout_s:.0f}s into the iteration")
                break
            if now >= next_check:
                self.check_paths_alive(work, watch())
                next_check = now + 1.0
                continue
            msg = self.channel.pull(work.number, timeout=min(deadline, next_check) - now)
            waited += time.monotonic() - now
            if msg is None:
                continue
            problem = check_task(work, msg, self.wire.shape, self.wire.dtype)
            if problem is not None:
                self.post.reject(msg, problem)
                continue
            t2 = time.monotonic()
            self._handle(work, msg)
            compute += time.monotonic() - t2
        work.stash.clear()  # graphs of microbatches given up
        return compute, waited

    def _handle(self, work: Iteration, msg: Message) -> None:
        if msg.kind == DROP:
            self.abandon(work, int(msg.meta["mb"]), bool(msg.meta["eval"]),
                         f"{msg.sender}: {msg.meta.get('why', '?')}", notify=False)
        elif msg.kind == BWD:
            self._backward(work, msg)
        elif msg.kind == FWD:
            m, is_eval = int(msg.meta["mb"]), bool(msg.meta["eval"])
            stays = not is_eval and int(msg.meta["hop"]) < len(work.path(m, False)) - 1
            if stays and not self._memory_free(work):
                work.deferred.append(msg)
            else:
                self._forward(work, msg)

    def check_paths_alive(self, work: Iteration, roster: list[PeerInfo]) -> None:
        """Give up the microbatches whose path runs through a node not in ``roster`` (by
        endpoint too: a node restarted under the same id is not the one on the path), or
        through one that stepped out to be handed its stage's state again (REJOINING: it
        takes no part in the iterations planned before the leader saw it)."""
        live = {(p.id, p.endpoint) for p in roster if p.round != REJOINING}
        for (m, is_eval), path in work.pending_paths().items():
            dead = [n for n in path if (n, work.endpoints[n]) not in live]
            if dead:
                self.abandon(work, m, is_eval, f"{', '.join(dead)} left the swarm")

    def abandon(self, work: Iteration, m: int, is_eval: bool, why: str, notify: bool = True) -> None:
        """Give a microbatch up here and, unless they told us, on the rest of its path: every
        node that waits for it stops waiting at once (a node that timed out a microbatch
        while the others still wait for it would otherwise leave them out of step)."""
        if (m, is_eval) in work.abandoned:
            return
        others = work.abandon(m, is_eval)
        log.warning("iteration %d: microbatch %d%s given up: %s", work.number, m, " (eval)" if is_eval else "", why)
        if notify:
            for node in others:
                msg = Message(DROP, round=work.number, meta={"mb": m, "eval": is_eval, "why": why})
                self.post.send(node, work.endpoints[node], msg)

    def _memory_free(self, work: Iteration) -> bool:
        return len(work.stash) < self.p.memory

    def _launch(self, work: Iteration, m: int, is_eval: bool) -> None:
        path = work.path(m, is_eval)
        if is_eval:
            x, y = self.val[m]
            with torch.no_grad():
                h = self.model.embed(x.to(self.device))
        else:
            x, y = self.sampler.next_batch()
            h = self.model.embed(x.to(self.device))
            work.stash[(m, 0)] = (None, h)
        work.targets[(m, is_eval)] = y.to(self.device)
        self.post.send_task(work, path[1], FWD, m, 1, is_eval, h)

    def _forward(self, work: Iteration, msg: Message) -> None:
        m, k, is_eval = int(msg.meta["mb"]), int(msg.meta["hop"]), bool(msg.meta["eval"])
        if (m, is_eval) in work.abandoned:
            return
        path = work.path(m, is_eval)
        h_in = msg.tensors[0].to(self.device, torch.float32)
        if k == len(path) - 1:  # back home: the loss, and at once its backward pass
            y = work.targets.pop((m, is_eval), None)
            if y is None:  # (a second copy of the last hop: the first finished the microbatch here)
                log.warning("iteration %d: microbatch %d came back again from %s; dropped", work.number, m, msg.sender)
                return
            if is_eval:
                with torch.no_grad():
                    work.val_losses.append(float(self.model.loss(h_in, y)))
            else:
                h = h_in.requires_grad_()
                loss = self.model.loss(h, y)
                loss.backward()
                work.losses.append(float(loss.detach()))
                self.post.send_task(work, path[k - 1], BWD, m, k - 1, False, h.grad)
        elif is_eval:
            with torch.no_grad():
                out = self.model.blocks(h_in)
            self.post.send_task(work, path[k + 1], FWD, m, k + 1, True, out)
        else:
            x = h_in.requires_grad_()
            y = self.model.blocks(x)
            work.stash[(m, k)] = (x, y)
            self.post.send_task(work, path[k + 1], FWD, m, k + 1, False, y)
        work.done_one(m, is_eval)

    def _backward(self, work: Iteration, msg: Message) -> None:
        m, k = int(msg.meta["mb"]), int(msg.meta["hop"])
        entry = work.stash.pop((m, k), None)
        if entry is None:
            if (m, False) not in work.abandoned:
                log.warning("iteration %d: backward for microbatch %d hop %d that this node does not hold",
                            work.number, m, k)
            return
        x, y = entry
        y.backward(msg.tensors[0].to(self.device, torch.float32))
        if k > 0:
            self.post.send_task(work, work.path(m, False)[k - 1], BWD, m, k - 1, False, x.grad)
        work.visited.append(m)
        work.done_one(m, False)
