"""How an outer algorithm adopts the state of a peer: when it is not where the swarm is
(``_catch_up``), from whom, and only when other peers vouch for that state. A mixin of
``OuterAlgorithm``: it uses the algorithm's swarm, round counters and state hooks
(``_load_synchronized``, ``_fetching``, ``_skip_syncs_to``, ``_event``)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from loco.protocols.membership import PeerInfo
from loco.protocols.state_sync import Snapshot, fetch_state, vouched, witness_digests

from .catch_up import state_position, state_to_adopt, unusable_state

log = logging.getLogger("loco.algorithm")


class Adopting:
    """The catch-up half of ``OuterAlgorithm``."""

    def _source_alive(self, endpoint: str) -> Callable[[], bool]:
        return lambda: any(p.endpoint == endpoint for p in self.swarm.peers())

    def _resync_from(self, endpoint: str, min_round: int, reason: str, probe_s: float | None = None) -> bool:
        """Adopt the state of the peer at ``endpoint`` (round >= ``min_round``)."""
        self._fetching(min_round)
        try:
            snap = fetch_state(self.swarm.transport, endpoint, min_round, self.join_timeout_s, self.stop_event,
                               alive=self._source_alive(endpoint), probe_s=probe_s)
        finally:
            self._fetching(None)
        problem = reason if snap is None else unusable_state(snap, self.name)
        if problem is None and not self._vouched_for(snap, endpoint):
            problem = f"other peers hold another state at round {snap.round}: not adopted"
            log.warning("the state %s served for round %d is not the one other peers hold; not adopted",
                        endpoint, snap.round)
        if problem is None:
            try:  # the meta is the peer's word: every field is checked before anything changes
                new_round, new_step = state_position(snap, self.inner_steps)
                self._load_synchronized(snap.tensors, snap.meta, endpoint)
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:  # another model, a bad meta
                problem = str(exc)[:300]
        if problem is not None:
            self._event("resync_failed", round=self.round, source=endpoint, reason=problem)
            return False
        old = self.round
        self.round, self.round_step = new_round, new_step
        self._weights_written = True
        self._skip_syncs_to(self._sync_id())
        self._event("resync", round=self.round, from_round=old, source=endpoint, reason=reason,
                    weights_hash=self.weights_hash())
        log.info("resynchronized from %s: round %d -> %d (%s)", endpoint, old, self.round, reason)
        return True

    def _vouched_for(self, snap: Snapshot, source: str) -> bool:
        """Another peer holds the same state at that round, or none holds one to compare
        (see ``vouched``): a lone source cannot make this process adopt a state of its own."""
        if not self.replicas_identical:
            return True
        mine = self.swarm.endpoint
        others = sorted((p for p in self.swarm.peers() if p.endpoint not in (source, mine)),
                        key=lambda p: (-p.round, p.id))[:self.witnesses]
        if not others:
            return True
        answers = witness_digests(self.swarm.transport, [p.endpoint for p in others], snap.round,
                                  timeout_s=min(3.0, self.join_timeout_s), stop=self.stop_event)
        return vouched(snap.digest, answers)

    def _catch_up(self) -> bool:
        """Adopt the state of the swarm where this node is not with it (see
        ``state_to_adopt``: further ahead than ``catch_up_slack``, or this node alone far
        ahead of a group that will not follow it)."""
        target = state_to_adopt(self.round, self._reachable_peers(), self.catch_up_slack)
        if target is None:
            return False
        best, source = target
        first_id = best * self.inner_steps if self.fine_grained else best
        how = "ahead" if best > self.round else "behind, this node alone ahead of them"
        if self._resync_from(source.endpoint, first_id, f"peers at round {best} ({how})", probe_s=self.probe_s):
            return True
        self._unreachable.mark(source, self.round)
        return False

    def _reachable_peers(self) -> list[PeerInfo]:
        """Live peers, less the sources that failed to serve their state and have not answered
        a probe since (see ``UnreachableSources``)."""
        return self._unreachable.reachable(self.swarm.peers(), self.round)
