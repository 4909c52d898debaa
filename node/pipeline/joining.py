"""Becoming a member. Iteration 0 of a fresh swarm takes everyone who is there; later, the
plan of iteration k admits a node (``joins``) with a source, a member replica of its stage,
which hands it the stage state after its step of k: the joiner takes part from k + 1,
bit-identical to the source. A joiner whose stage has no member brings its own state (its
checkpoint, else the seed) and takes part in k at once; one whose source leaves before
sending asks to be admitted again (REJOINING) and gets the state from another replica."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from loco.protocols.membership import Membership
from loco.protocols.pipeline.channel import Channel
from loco.protocols.pipeline.plan import HANDOFF, Iteration, check_plan
from loco.protocols.state_sync import tensors_hash
from loco.protocols.wire import Message

from ..config import Config
from ..metrics import MetricsWriter
from .planning import Planner
from .post import Post
from .stage_state import StageState
from .standing import Standing

log = logging.getLogger("loco.node.pipeline")


class Joining:
    def __init__(self, cfg: Config, standing: Standing, state: StageState, planner: Planner, membership: Membership,
                 channel: Channel, post: Post, metrics: MetricsWriter, stop: threading.Event,
                 own_state: Callable[[], str]):
        """``own_state()`` loads the state this node brings when its stage has no live
        replica and says which (``StageCheckpoints.resume``)."""
        self.cfg, self.standing, self.state, self.planner = cfg, standing, state, planner
        self.membership, self.channel, self.post, self.metrics = membership, channel, post, metrics
        self.stop, self.own_state = stop, own_state

    def join(self) -> bool:
        """Wait for a plan that makes this node a member: iteration 0 of a fresh swarm (this
        node plans it if it leads), or a plan that admits it (``joins``). Returns False if
        stopped; raises ConnectionError if the stage state it was promised never came."""
        me, planner = self.standing, self.planner
        me.ready = True
        self.membership.announce(me.peer_info())  # JOINING (or REJOINING): not (or no longer) a member
        planned = False
        while not self.stop.is_set():
            if planner.prev is None and not planned and planner.fresh_swarm():
                roster = planner.whole_roster()
                if roster is not None and planner.leader(roster) == me.id:
                    planned = planner.send_plan(0, roster)
            plans = self.channel.plans
            for number in sorted(plans):
                msg = plans[number]
                problem = check_plan(msg.meta)
                if problem is not None:
                    del plans[number]
                    self.post.reject(msg, problem)
                    continue
                meta = msg.meta
                if meta["endpoints"].get(me.id) != me.endpoint:
                    del plans[number]  # not for this node (or for its earlier run)
                    continue
                source = meta.get("joins", {}).get(me.id)
                if me.id in meta["stages"]:
                    if number == 0 and planner.prev is None:
                        return self._became_member(0, "seed")
                    if source == "":  # no replica of its stage is alive: it brings its own state
                        return self._became_member(number, self.own_state())
                    if me.rejoining:  # planned before the leader saw that its hand-off failed
                        del plans[number]
                        continue
                    raise ConnectionError(f"plan {number} counts this node as a member, but no plan admitted it "
                                          f"(its hand-off plan was lost); restart it to join again")
                del plans[number]
                if source and self._receive_state(source, number, meta["endpoints"][source]):
                    planner.prev = meta
                    return self._became_member(number + 1, f"replica {source}")
            self.channel.pull(-1, timeout=1.0)
        return False

    def _became_member(self, it: int, source: str) -> bool:
        me = self.standing
        me.it, me.member, me.rejoining = it, True, False
        self.channel.forget_before(it)
        self.membership.announce(me.peer_info())
        self.metrics.write("join", round=it, stage=me.stage, source=source,
                           weights_hash=tensors_hash(self.state.params))
        log.info("member from iteration %d (stage %d state: %s)", it, me.stage, source)
        return True

    def _receive_state(self, source: str, number: int, endpoint: str) -> bool:
        """The stage state ``source`` sends after its step of iteration ``number``. False:
        ``source`` left the swarm before sending it; this node then asks to be admitted
        again (its record says REJOINING), and the leader names another replica of its
        stage, or none (it then brings its own checkpoint)."""
        me = self.standing
        deadline = time.monotonic() + self.cfg.swarm.join_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            while (msg := self.channel.next_filed(HANDOFF)) is not None:
                if msg.sender != source or msg.round != number:
                    log.info("ignored stage state of iteration %d from %s (waiting for %s's of %d)",
                             msg.round, msg.sender, source, number)
                    continue
                problem = self.state.adopt(msg.tensors, msg.meta)
                if problem is None:
                    return True
                self.post.reject(msg, problem)
            if not any(p.id == source and p.endpoint == endpoint for p in self.membership.peers()):
                log.warning("%s, which was to send stage %d's state after iteration %d, left the swarm; asking "
                            "to join again", source, me.stage, number)
                me.rejoining = True
                self.membership.announce(me.peer_info())
                return False
            self.channel.pull(-1, timeout=1.0)
        if not self.stop.is_set():
            raise ConnectionError(f"no stage {me.stage} state from {source} within "
                                  f"swarm.join_timeout_s={self.cfg.swarm.join_timeout_s:.0f}s")
        return False

    def hand_off(self, work: Iteration, joiner: str) -> None:
        """Send a joining replica this stage's state after iteration ``work``'s step."""
        tensors, meta = self.state.snapshot()
        self.post.send(joiner, work.endpoints[joiner], Message(HANDOFF, round=work.number, meta=meta, tensors=tensors))
        log.info("iteration %d: sent stage %d's state to %s, which joins", work.number, self.standing.stage, joiner)
