"""Serving and fetching a node's synchronized state (late join, resynchronization).

A node publishes a snapshot after every outer step: opaque tensors (the caller decides
what they are: anchor weights, outer momentum, ...) plus a small meta map that includes
the round and a hash of the tensors. Any peer may ask for it::

    requester --STATE_REQ(min_round, endpoint, request_id)--> server
    server    --STATE(round, hash, meta; tensors)--> requester

and a second peer can vouch for what the first one served (its hash of the same round, from
the digests it remembers of the snapshots it published)::

    requester --STATE_DIGEST_REQ(round, endpoint, request_id)--> witness
    witness   --STATE_DIGEST(round, hash or "")--> requester

The server answers from its I/O thread. A request for a round the server has not reached
yet is parked and answered when that snapshot is published (so a node that missed round r
can ask the leader for round r+1 before the leader has finished applying it), or dropped
when its deadline passes. Replies carry the request id in the ``attempt`` field so that
a late answer to an earlier request is never mistaken for the current one.

Snapshots are replaced, never modified in place, which is what makes sending them
without a copy safe while training goes on.

A member of several processes may serve its state *in parts*, so that no process holds the
whole of it: every rank serves its own region (kind ``STATE_PART``, from its own endpoint),
and the leader's STATE reply carries no tensors, only the hash of the whole and where the
parts are (``meta["parts"]``: the endpoints in order, the round they were published at,
and the shapes the concatenated parts make up). :func:`fetch_state` fetches the parts from
every endpoint at once, puts the tensors together and checks them against the leader's
hash, which is the same :func:`tensors_hash` a one-process member computes of the same
state (the leader computes it with :class:`StreamHash`, from the ranks' regions sent to it
one at a time): a requester cannot tell the two apart, and members of any rank count agree
on the hash. A CO2 reduce's mean (kind ``CO2_RESULT``) is served in parts the same way, its
parts of kind ``CO2_RESULT_PART`` (``messages.PART_OF``).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import blake3
import torch

from .flat import shaped_views
from .host_copy import HostMover, ready_event
from .messages import PART_OF, STATE, STATE_DIGEST
from .transport import Transport
from .wire import Message

log = logging.getLogger(__name__)

STATE_REQ = f"{STATE}_REQ"
DIGESTS_KEPT = 256  # rounds whose hash a state server can still vouch for (a few strings each)
MAX_PARTS = 1024  # endpoints a state served in parts may name (the ranks of one member)


def tensors_hash(tensors: list[torch.Tensor]) -> str:
    """A short, stable digest of tensor contents (dtype and shape included)."""
    return _hashes(tensors, 0)[1]


def _hashes(tensors: list[torch.Tensor], prefix: int) -> tuple[str, str]:
    """(tensors_hash of the first ``prefix`` tensors, of all of them) in one pass. BLAKE3 on
    all cores: a model-sized state (hundreds of MB) hashes in a fraction of a round, where
    one core's BLAKE2b took longer than a GPU round (the next outer step waited for it)."""
    stream = StreamHash([(t.dtype, tuple(t.shape)) for t in tensors], prefix)
    for t in tensors:
        stream.update(t)
    return stream.digests()


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class StreamHash:
    """:func:`tensors_hash` of tensors of the given (dtype, shape), fed as the stream of
    their bytes in order, in pieces of any size that need not follow the tensors'
    boundaries (a member's state arriving one rank's region at a time: nothing holds all
    of it at once). BLAKE3 is sequential over its input, so the digest is the same however
    the bytes are cut. ``prefix``: also the digest of the first ``prefix`` tensors."""

    def __init__(self, specs: list[tuple[torch.dtype, tuple[int, ...]]], prefix: int = 0):
        self._headers = [f"{dtype}{tuple(shape)}".encode() for dtype, shape in specs]
        self._sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in specs]
        self._prefix = prefix
        self._h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._first = self._h.hexdigest(length=8) if prefix == 0 else ""
        self._i = 0  # the tensor the next bytes belong to
        self._left = 0  # its bytes still to come (once its header is in)
        self._open = False  # its header is in
        self._settle()

    def _settle(self) -> None:
        # every tensor header goes in right before its bytes; tensors with no bytes left close
        while self._i < len(self._sizes):
            if not self._open:
                self._h.update(self._headers[self._i])
                self._open, self._left = True, self._sizes[self._i]
            if self._left:
                return
            self._open = False
            self._i += 1
            if self._i == self._prefix:
                self._first = self._h.hexdigest(length=8)

    def update(self, piece: torch.Tensor) -> None:
        """The next bytes of the stream: ``piece``'s, as raw bytes (any dtype)."""
        data = _raw(piece)
        while len(data):
            if self._i >= len(self._sizes):
                raise ValueError(f"{len(data)} bytes past the end of the tensors being hashed")
            take = min(len(data), self._left)
            self._h.update(data[:take])
            data, self._left = data[take:], self._left - take
            self._settle()

    def digests(self) -> tuple[str, str]:
        """(digest of the first ``prefix`` tensors, of all of them), once all bytes are in."""
        if self._i < len(self._sizes):
            raise ValueError(f"the stream ended inside tensor {self._i} of {len(self._sizes)} "
                             f"({self._left} of its bytes missing)")
        return self._first, self._h.hexdigest(length=8)


class Snapshot:
    """Tensors (never modified), meta, and their digest: given, or computed in the
    background from the moment the snapshot is made (``digest`` waits for it).
    ``prefix``: also the digest of the first ``prefix`` tensors (``prefix_digest``; the
    daemon's weights come first in its state), from the same pass. ``hasher``: where that
    pass runs (None: on the caller's thread, now); GPU tensors given with a hasher are
    private device copies, moved to host memory by that thread before it hashes them
    (``tensors`` waits for the move)."""

    def __init__(self, round: int, tensors: list[torch.Tensor], meta: dict[str, Any], digest: str | None = None,
                 prefix: int = 0, hasher: ThreadPoolExecutor | None = None,
                 digests: tuple[str, str] | None = None, hashed: bool = True):
        """``digests``: (prefix digest, digest), known already (a state served in parts).
        ``hashed`` False: no digest at all (("", ""); a part of a state served in parts,
        whose whole is hashed elsewhere), the tensors still moved to host memory by
        ``hasher``."""
        self.round = round
        self.meta = meta
        self.prefix = prefix
        self.hashed = hashed
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self._tensors = tensors
        self._on_host = threading.Event()
        self._digests: tuple[str, str] | None = None
        self._pending: Future[tuple[str, str]] | None = None
        if digests is not None:
            self._digests = digests
        elif digest is not None and not prefix:
            self._digests = ("", digest)
        elif hasher is None:
            self._digests = _hashes(tensors, prefix) if hashed else ("", "")
        # recorded by the caller's thread, right after the copies that made the tensors
        ready = ready_event(tensors) if self._digests is None else None
        if ready is None:
            self._on_host.set()
        if hasher is not None and self._digests is None:
            self._pending = hasher.submit(self._move_and_hash, ready)

    def _move_and_hash(self, ready: Any) -> tuple[str, str]:
        if ready is not None:
            self._tensors = [HostMover(ready)(t) for t in self._tensors]
        self._on_host.set()
        return _hashes(self._tensors, self.prefix) if self.hashed else ("", "")

    @property
    def tensors(self) -> list[torch.Tensor]:
        if not self._on_host.is_set():
            assert self._pending is not None
            self._pending.exception()  # wait for the background pass (it sets _on_host first)
            if not self._on_host.is_set():
                raise RuntimeError(f"snapshot of round {self.round}: the copy to host memory failed")
        return self._tensors

    def _wait(self) -> tuple[str, str]:
        if self._digests is None:
            assert self._pending is not None
            self._digests = self._pending.result()
        return self._digests

    @property
    def digest(self) -> str:
        return self._wait()[1]

    def when_hashed(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(digest)`` once the digest is known: now, or from the hashing
        thread when its pass is done (not at all if that pass failed)."""
        if self._pending is None:
            callback(self.digest)
        else:
            self._pending.add_done_callback(lambda f: f.exception() is None and callback(f.result()[1]))

    @property
    def prefix_digest(self) -> str:
        return self._wait()[0]


class StateServer:
    """Holds the latest ``keep`` snapshots and answers ``<kind>_REQ`` messages with the
    oldest one at or after the requested round (keep=1: always the latest).

    ``kind`` lets one node serve several things: its state ("STATE"), and, for CO2, the
    recent reduce results a replica that adopted a peer's state still has to apply."""

    def __init__(self, transport: Transport, max_wait_s: float = 600.0, kind: str = STATE, keep: int = 1,
                 hashed: bool = True):
        """``hashed`` False: the snapshots are served without a digest of their own (the
        parts of a state served in parts: the fetcher checks the whole against the hash the
        leader serves, so hashing every part too would be work nobody reads)."""
        self.transport = transport
        self.hashed = hashed
        self.max_wait_s = max_wait_s
        self.kind = kind
        self.keep = keep
        self._snapshots: list[Snapshot] = []
        self._pending: list[tuple[float, Message]] = []
        self._lock = threading.Lock()
        self._digests: dict[int, str] = {}  # round -> hash of the snapshot published at it
        # one thread per server hashes its snapshots: BLAKE2b releases the GIL, so a
        # model-sized hash (about a second per 700 MB) runs beside training instead of
        # between two rounds. Owned here, so close() leaves no thread behind.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loco-hash")
        transport.on(f"{kind}_REQ", self._on_request)
        if kind == STATE:
            transport.on(f"{STATE_DIGEST}_REQ", self._on_digest_request)

    @property
    def _snapshot(self) -> Snapshot | None:
        return self._snapshots[-1] if self._snapshots else None

    def _find(self, min_round: int) -> Snapshot | None:
        return next((s for s in self._snapshots if s.round >= min_round), None)

    def publish(self, round: int, tensors: list[torch.Tensor], meta: dict[str, Any], prefix: int = 0,
                digests: tuple[str, str] | None = None) -> Snapshot:
        """``digests``: (prefix digest, digest) of the state, computed by the caller (a state
        served in parts, whose ``meta["parts"]`` says where: see :func:`parts_meta`)."""
        # a private copy of each, where it lives: on a GPU a device-to-device copy, which the
        # hashing thread moves to host memory (the training thread does not wait for it)
        snap = Snapshot(round, [t.detach().clone() for t in tensors], dict(meta),
                        prefix=prefix, hasher=None if digests is not None else self._hasher, digests=digests,
                        hashed=self.hashed)
        if self.hashed:
            snap.when_hashed(lambda digest: self._remember(round, digest))
        with self._lock:
            self._snapshots = [*self._snapshots, snap][-self.keep:]
            now = time.monotonic()
            due = [m for d, m in self._pending if d > now and m.meta["min_round"] <= round]
            self._pending = [(d, m) for d, m in self._pending
                             if d > now and m.meta["min_round"] > round]
        for m in due:
            self._reply(m, snap)
        return snap

    @property
    def held_bytes(self) -> int:
        """Bytes of the tensors of the snapshots kept to serve."""
        with self._lock:
            return sum(s.nbytes for s in self._snapshots)

    def published(self, round: int) -> Snapshot | None:
        """The snapshot published at ``round`` exactly, if still kept."""
        with self._lock:
            return next((s for s in self._snapshots if s.round == round), None)

    def _remember(self, round: int, digest: str) -> None:
        with self._lock:
            self._digests[round] = digest
            while len(self._digests) > DIGESTS_KEPT:
                del self._digests[min(self._digests)]

    def _on_digest_request(self, msg: Message) -> None:
        with self._lock:
            digest = self._digests.get(msg.meta["round"], "")
        self.transport.send(msg.meta["endpoint"], Message(
            STATE_DIGEST, round=-1, attempt=msg.attempt, meta={"round": msg.meta["round"], "hash": digest}))

    def close(self) -> None:
        """Stop answering and end the hashing thread (after the hash in progress)."""
        self.transport.on(f"{self.kind}_REQ", lambda msg: None)
        if self.kind == STATE:
            self.transport.on(f"{STATE_DIGEST}_REQ", lambda msg: None)
        self._hasher.shutdown(wait=True)

    def _on_request(self, msg: Message) -> None:
        min_round, endpoint = msg.meta.get("min_round"), msg.meta.get("endpoint")
        if not isinstance(min_round, int) or not isinstance(endpoint, str):
            log.warning("malformed STATE_REQ from %s: %r", msg.sender, msg.meta)
            return
        with self._lock:
            snap = self._find(min_round)
            if snap is None:
                self._pending.append((time.monotonic() + self.max_wait_s, msg))
                return
        self._reply(msg, snap)

    def _reply(self, req: Message, snap: Snapshot) -> None:
        # once the snapshot is on the host and hashed: not by blocking the I/O thread
        snap.when_hashed(lambda digest: self.transport.send(req.meta["endpoint"], Message(
            self.kind, round=-1, attempt=req.attempt,
            meta={"round": snap.round, "hash": digest, "meta": snap.meta},
            tensors=snap.tensors,
        )))


_request_ids = itertools.count(1)


def fetch_state(
    transport: Transport, endpoint: str, min_round: int = 0, timeout_s: float = 60.0,
    stop: threading.Event | None = None, alive: Callable[[], bool] | None = None,
    check_every_s: float = 2.0, kind: str = STATE, probe_s: float | None = None,
) -> Snapshot | None:
    """Ask the node at ``endpoint`` for its snapshot of round >= ``min_round``.

    Returns None if no valid answer came before the deadline, or as soon as ``alive()``
    says the source is gone (checked every ``check_every_s``); a reply whose tensors do not
    match its declared hash is rejected (and logged), never used. ``probe_s``: first ask
    for a small answer (its digest) and give up if none comes within that time: a source
    that the DHT shows but this node cannot reach (a partition) costs seconds, not the
    whole timeout a large state may need."""
    if probe_s is not None and endpoint not in witness_digests(transport, [endpoint], min_round, probe_s, stop):
        log.warning("state source %s did not answer within %.0fs; not asking it for its state", endpoint, probe_s)
        return None
    request_id = next(_request_ids)
    transport.send(endpoint, Message(f"{kind}_REQ", attempt=request_id, meta={
        "min_round": min_round, "endpoint": transport.endpoint,
    }))
    deadline = time.monotonic() + timeout_s
    reply = None
    while reply is None and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        wait = min(check_every_s, deadline - time.monotonic()) if alive else deadline - time.monotonic()
        reply = transport.recv(kind, -1, request_id, timeout_s=max(0.0, wait), stop=stop)
        if reply is None and alive is not None and not alive():
            log.warning("state source %s left the swarm; giving up", endpoint)
            return None
    if reply is None:
        log.warning("no state from %s within %.0fs", endpoint, timeout_s)
        return None
    meta = reply.meta.get("meta")
    rnd = reply.meta.get("round")
    if not isinstance(meta, dict) or not isinstance(rnd, int) or rnd < min_round:
        log.warning("state from %s is malformed or too old (round %r < %d)", reply.sender, rnd, min_round)
        return None
    tensors: list[torch.Tensor] | None = reply.tensors
    if "parts" in meta:
        if kind not in PART_OF:
            log.warning("%s from %s names parts, which a %s is never served in; rejected", kind, reply.sender, kind)
            return None
        meta = dict(meta)
        tensors = _fetch_parts(transport, meta.pop("parts"), reply.sender, deadline, stop, PART_OF[kind])
        if tensors is None:
            return None
    digest = tensors_hash(tensors)
    if digest != reply.meta.get("hash"):
        log.warning("state from %s fails its hash check (%s != %s); rejected",
                    reply.sender, digest, reply.meta.get("hash"))
        return None
    # received tensors are views over zmq frames: clone so they outlive the message
    return Snapshot(rnd, [t.clone() for t in tensors], meta, digest)


def parts_meta(endpoints: list[str], round: int, sections: list[list[tuple[int, ...]]]) -> dict[str, Any]:
    """Where a state served in parts is (the ``"parts"`` entry of the leader's snapshot meta):
    the endpoint of every part in order, which published its part at ``round`` (kind
    STATE_PART, or the part kind of what is served: ``messages.PART_OF``); part ``p``
    serves one 1-D tensor per section, and section ``s`` is the
    concatenation of every part's tensor ``s``, cut into tensors of ``sections[s]``'s shapes."""
    return {"endpoints": list(endpoints), "round": round, "sections": [[list(shape) for shape in shapes]
                                                                       for shapes in sections]}


def _parts_layout(parts: Any) -> tuple[list[str], int, list[list[tuple[int, ...]]]] | None:
    if not isinstance(parts, dict) or set(parts) != {"endpoints", "round", "sections"}:
        return None
    endpoints, rnd, sections = parts["endpoints"], parts["round"], parts["sections"]
    if not (isinstance(endpoints, list) and 0 < len(endpoints) <= MAX_PARTS and isinstance(rnd, int)
            and all(isinstance(e, str) for e in endpoints) and isinstance(sections, list)):
        return None
    shapes: list[list[tuple[int, ...]]] = []
    for section in sections:
        if not isinstance(section, list) or not all(
                isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in section):
            return None
        shapes.append([tuple(s) for s in section])
    return endpoints, rnd, shapes


def _fetch_parts(transport: Transport, parts: Any, source: str, deadline: float,
                 stop: threading.Event | None, part_kind: str) -> list[torch.Tensor] | None:
    """The tensors of a state served in parts (see :func:`parts_meta`), each part of kind
    ``part_kind``: every part asked for at once, put together in order. None (logged) if
    one does not come by ``deadline`` or does not fit the layout the leader declared."""
    layout = _parts_layout(parts)
    if layout is None:
        log.warning("state from %s names its parts in a malformed way; rejected", source)
        return None
    endpoints, rnd, sections = layout
    asked = []
    for endpoint in endpoints:
        request_id = next(_request_ids)
        transport.send(endpoint, Message(f"{part_kind}_REQ", attempt=request_id,
                                         meta={"min_round": rnd, "endpoint": transport.endpoint}))
        asked.append((endpoint, request_id))
    pieces: list[list[torch.Tensor]] = [[] for _ in sections]
    for endpoint, request_id in asked:
        reply = transport.recv(part_kind, -1, request_id, timeout_s=max(0.0, deadline - time.monotonic()),
                               stop=stop)
        if reply is None or reply.meta.get("round") != rnd or len(reply.tensors) != len(sections) \
                or any(t.dim() != 1 for t in reply.tensors):
            log.warning("part %s of the state from %s (round %d) %s; rejected", endpoint, source, rnd,
                        "did not come in time" if reply is None else "does not fit")
            return None
        for s, t in enumerate(reply.tensors):
            pieces[s].append(t)
    tensors: list[torch.Tensor] = []
    for s, shapes in enumerate(sections):
        flat, want = torch.cat(pieces[s]), sum(math.prod(shape) for shape in shapes)
        if flat.numel() != want:
            log.warning("the parts of the state from %s hold %d values of section %d, its shapes %d; rejected",
                        source, flat.numel(), s, want)
            return None
        tensors += shaped_views(flat, shapes)
    return tensors


def witness_digests(transport: Transport, endpoints: list[str], round: int, timeout_s: float = 10.0,
                    stop: threading.Event | None = None) -> dict[str, str]:
    """Ask each of ``endpoints`` for its hash of the snapshot it published at ``round``.
    Returns {endpoint: hash} for those that answered in time ("" from one that published
    none at that round, or no longer remembers it)."""
    asked = {send_probe(transport, endpoint, round): endpoint for endpoint in endpoints}
    answers: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    for request_id, endpoint in asked.items():
        reply = transport.recv(STATE_DIGEST, -1, request_id, timeout_s=max(0.0, deadline - time.monotonic()),
                               stop=stop)
        if reply is not None and reply.meta["round"] == round:
            answers[endpoint] = reply.meta["hash"]
    return answers


def send_probe(transport: Transport, endpoint: str, round: int) -> int:
    """Ask ``endpoint`` for its digest of ``round`` without waiting (a small request any state
    server answers at once); returns the request id for :func:`probe_answered`."""
    request_id = next(_request_ids)
    transport.send(endpoint, Message(f"{STATE_DIGEST}_REQ", attempt=request_id,
                                     meta={"round": round, "endpoint": transport.endpoint}))
    return request_id


def probe_answered(transport: Transport, request_id: int) -> bool:
    """Whether the answer to probe ``request_id`` has arrived (does not wait)."""
    return transport.recv(STATE_DIGEST, -1, request_id, timeout_s=0) is not None


def vouched(digest: str, witnesses: dict[str, str]) -> bool:
    """Whether a state with hash ``digest`` may be adopted, given what witnesses (other
    peers) hold at the same round: yes if one holds the same state, or if none holds any
    state of that round (nothing to compare with: a swarm of two, peers that moved on);
    no if every witness that holds one holds another (a source serving a state nobody
    else has)."""
    held = [h for h in witnesses.values() if h]
    return not held or digest in held
