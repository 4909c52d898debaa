"""ZeroMQ transport: one bound ROUTER socket per node for everything it receives, one
DEALER socket per remote endpoint for everything it sends.

Every message is one-way: a reply is a new message sent to the requester's own endpoint
(carried in the request's meta). That keeps one socket pattern for all traffic and means
a node never blocks on a peer's socket state.

Threads: an I/O thread owns the ROUTER. It verifies each message (signature, replay,
frame sizes) and either calls a registered handler (requests that must be served while
the node trains, e.g. STATE) or files it in a mailbox that the training thread reads
with a deadline. Outgoing DEALER sockets are shared by the training and I/O threads; each
has a lock, because ZeroMQ sockets are not thread-safe and a message interleaved with
another would be corrupt.

Bytes are counted here, where frames leave and enter the socket: the figures in the
metrics are measured, not estimated. Under network emulation a message waits in the
shaper's queue before it reaches the socket, so ``bytes_sent`` lags what the protocols
sent by up to the emulated transfer time; ``bytes_queued`` counts each message when it is
handed to the transport (it includes messages the emulated link then loses), which is what
a round's own traffic is measured with.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable

import zmq

from .identity import IdentityPins, NodeKey
from .messages import MetaError, MetaValidator
from .shaper import Shaper
from .wire import DEFAULT_MAX_MESSAGE_BYTES, Message, WireError, decode, encode, message_nbytes

log = logging.getLogger(__name__)

Handler = Callable[[Message], None]
MailKey = tuple[str, int, int]  # (kind, round, attempt)

# how often a wait on peers looks at the DHT view for peers that left (AbsenceWatch needs two
# looks in a row): a dead peer costs its record's expiry plus one to two of these
ABSENCE_CHECK_S = 1.0


class ReplayGuard:
    """Rejects a message seen before or too old: per sender session, seq must increase.

    Sessions are remembered for ``window_s`` after their last message (older ones could
    only be replayed outside the window, which is rejected anyway), so the table stays
    bounded. ``not_before`` (wall clock) is this process's start minus the clock skew
    allowed between hosts: a message captured before a restart is void afterwards, though
    the new process has no memory of the sessions it saw before."""

    def __init__(self, window_s: float = 300.0, not_before: float = 0.0, max_sessions: int = 65_536):
        self.window_s = window_s
        self.max_sessions = max_sessions  # senders: with a swarm key only members can add one
        self.not_before = not_before
        self._last_seq: dict[str, tuple[int, float]] = {}
        self._next_sweep = time.monotonic() + window_s

    def check(self, msg: Message) -> str | None:
        now = time.time()
        if not abs(now - msg.time) <= self.window_s:  # `not <=`: a NaN time is rejected too
            return f"timestamp {msg.time!r} outside the {self.window_s:.0f}s replay window"
        if msg.time < self.not_before:
            return "sent before this process started (a replay from an earlier run)"
        # per sender and session: a member that reuses another's session id cannot void its messages
        session = f"{msg.sender}\0{msg.session}"
        last = self._last_seq.get(session, (-1, 0.0))[0]
        if msg.seq <= last:
            return f"replayed or reordered message (seq {msg.seq} <= {last})"
        self._last_seq.pop(session, None)  # re-inserted last: the dict is oldest first
        self._last_seq[session] = (msg.seq, now)
        if len(self._last_seq) > self.max_sessions:
            del self._last_seq[next(iter(self._last_seq))]
        if time.monotonic() > self._next_sweep:
            self._last_seq = {k: v for k, v in self._last_seq.items() if now - v[1] <= self.window_s}
            self._next_sweep = time.monotonic() + self.window_s
        return None


class DropLog:
    """Counts dropped messages by reason and logs them without flooding the log: the
    first of each reason at once, then one summary line per reason every ``every_s``."""

    def __init__(self, every_s: float = 10.0, what: str = "message"):
        self.every_s = every_s
        self.what = what
        self.counts: dict[str, int] = defaultdict(int)
        self._logged: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def drop(self, reason: str, detail: str) -> None:
        with self._lock:
            self.counts[reason] += 1
            count = self.counts[reason]
            last = self._logged.get(reason)
            now = time.monotonic()
            if last is not None and now - last[0] < self.every_s:
                return
            self._logged[reason] = (now, count)
        if last is None:
            log.warning("dropped a %s (%s): %s", self.what, reason, detail[:300])
        else:
            log.warning("dropped %d more %s(s) (%s) in %.0fs; latest: %s", count - last[1], self.what, reason,
                        now - last[0], detail[:300])


class AbsenceWatch:
    """Which awaited peers have left: absent from the DHT view (``live()``: the ids in it, or
    (id, session) pairs) at two checks in a row, or shown with another session than in
    ``sessions`` (those the wait started with; else those of the first check): the process
    died and a new one took its id, so what the old one owed is never coming. Twice, so that
    one failed lookup (an empty view) does not count as everyone leaving; ``live()`` may
    raise ``ConnectionError`` for a view that is unknown, which counts as everyone present."""

    def __init__(self, live: Callable[[], Iterable[str | tuple[str, str]]], sessions: dict[str, str] | None = None):
        self.live = live
        self._absent_before: set[str] = set()
        self._sessions: dict[str, str] = dict(sessions or {})  # id -> the session awaited

    def gone(self, awaited: set[str]) -> set[str]:
        try:
            seen = dict((e, "") if isinstance(e, str) else e for e in self.live())
        except ConnectionError:
            seen = {node: self._sessions.get(node, "") for node in awaited}
        restarted = set()
        for node in awaited & seen.keys():
            first = self._sessions.setdefault(node, seen[node])
            if first and seen[node] and seen[node] != first:
                restarted.add(node)
        absent = awaited - seen.keys()
        gone = (absent & self._absent_before) | restarted
        self._absent_before = absent
        return gone


class Mailbox:
    """Messages waiting for the training thread, keyed by (kind, round, attempt).

    Bounded, because peers decide what arrives and the training thread may be slow to read
    (busy in its inner steps): a sender may hold at most ``max_bytes_per_sender`` and
    ``max_messages_per_sender`` here at a time, all senders together at most
    ``max_total_bytes``; what does not fit is refused (dropped and counted as
    ``MailboxFull``: every protocol above copes with a lost message by its deadlines), so a
    slow consumer costs messages, never unbounded memory. A message nobody took within
    ``ttl_s`` (a kind no wait asks for, a round far ahead) expires."""

    def __init__(self, max_bytes_per_sender: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_messages_per_sender: int = 4096, ttl_s: float = 900.0,
                 max_total_bytes: int | None = None) -> None:
        self._items: dict[MailKey, list[Message]] = defaultdict(list)
        self._cond = threading.Condition()
        self.max_bytes_per_sender = max_bytes_per_sender
        self.max_messages_per_sender = max_messages_per_sender
        # default: room for four senders' worth at once (an all-reduce's parts from every
        # member together are about one model; a state transfer is one model)
        self.max_total_bytes = 4 * max_bytes_per_sender if max_total_bytes is None else max_total_bytes
        self.ttl_s = ttl_s
        self._held: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # sender -> [messages, bytes]
        self._total_bytes = 0
        self._last_sweep = time.monotonic()

    @staticmethod
    def _size(msg: Message) -> int:
        return sum(t.numel() * t.element_size() for t in msg.tensors)

    def put(self, msg: Message) -> str | None:
        """File ``msg``; returns why it was refused (None: filed)."""
        size = self._size(msg)
        with self._cond:
            if self._total_bytes + size > self.max_total_bytes:
                return (f"{self._total_bytes} bytes unread from all senders; {size} more would pass "
                        f"the mailbox's limit of {self.max_total_bytes}")
            held = self._held[msg.sender]
            if held[0] >= self.max_messages_per_sender or held[1] + size > self.max_bytes_per_sender:
                return (f"{msg.sender[:64]} already holds {held[0]} messages, {held[1]} bytes unread "
                        f"(limits {self.max_messages_per_sender}, {self.max_bytes_per_sender})")
            held[0] += 1
            held[1] += size
            self._total_bytes += size
            msg.received = time.monotonic()
            self._items[(msg.kind, msg.round, msg.attempt)].append(msg)
            if time.monotonic() - self._last_sweep > self.ttl_s / 4:
                self._expire()
            self._cond.notify_all()
        return None

    def _release(self, msgs: Iterable[Message]) -> None:
        """Caller holds the lock: ``msgs`` left the mailbox."""
        for m in msgs:
            held = self._held.get(m.sender)
            if held is not None:
                size = self._size(m)
                held[0] -= 1
                held[1] -= size
                self._total_bytes -= size
                if held[0] <= 0:
                    del self._held[m.sender]

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for key in list(self._items):
            old = [m for m in self._items[key] if m.received < cutoff]
            if old:
                self._release(old)
                self._items[key] = [m for m in self._items[key] if m.received >= cutoff]
            if not self._items[key]:
                del self._items[key]
        self._last_sweep = time.monotonic()

    def held(self) -> tuple[int, int]:
        """(messages, bytes) waiting here."""
        with self._cond:
            return sum(h[0] for h in self._held.values()), sum(h[1] for h in self._held.values())

    def take(
        self, kind: str, round: int, attempt: int, senders: Iterable[str] | None,
        deadline: float, want: int | None = None, stop: threading.Event | None = None,
    ) -> dict[str, Message]:
        """Wait until a message from every sender in ``senders`` (or ``want`` messages from
        anyone when ``senders`` is None) has arrived, or until ``deadline``
        (time.monotonic()). Returns what arrived, by sender; the first message per sender wins."""
        wanted = None if senders is None else set(senders)
        key = (kind, round, attempt)
        got: dict[str, Message] = {}
        with self._cond:
            while True:
                pending = self._items.get(key, [])
                keep = []
                taken = []
                for m in pending:
                    if (wanted is None or m.sender in wanted) and m.sender not in got:
                        got[m.sender] = m
                        taken.append(m)
                    else:
                        keep.append(m)
                if pending:
                    self._items[key] = keep
                    self._release(taken)
                done = wanted <= got.keys() if wanted is not None else len(got) >= (want or 1)
                left = deadline - time.monotonic()
                if done or left <= 0 or (stop is not None and stop.is_set()):
                    return got
                self._cond.wait(min(left, 0.25) if stop is not None else left)

    def take_from_live(
        self, kind: str, round: int, attempt: int, senders: Iterable[str], deadline: float,
        live: Callable[[], Iterable[str | tuple[str, str]]], stop: threading.Event | None = None,
        check_s: float = ABSENCE_CHECK_S, moved_on: Callable[[], Iterable[str]] | None = None,
        sessions: dict[str, str] | None = None,
    ) -> dict[str, Message]:
        """:meth:`take`, but it stops waiting for a sender that has left the DHT view (see
        :class:`AbsenceWatch`), read every ``check_s``: a peer that died costs its record's
        expiry, not the whole deadline. Nor for one in ``moved_on()`` (read as often): known
        to be past this wait, which needs no second look. ``sessions``: see AbsenceWatch."""
        waiting = set(senders)
        got: dict[str, Message] = {}
        watch = AbsenceWatch(live, sessions)
        while True:
            step = min(deadline, time.monotonic() + check_s)
            got.update(self.take(kind, round, attempt, waiting - got.keys(), step, stop=stop))
            if waiting <= got.keys() or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return got
            past = (waiting - got.keys()) & set(moved_on() if moved_on else ())
            if past:
                log.info("%s of round %d: %s moved past it; not waiting for them", kind, round, sorted(past))
                waiting -= past
                if waiting <= got.keys():
                    return got
            gone = watch.gone(waiting - got.keys())
            if gone:
                log.info("%s of round %d: %s left the swarm; not waiting for them", kind, round, sorted(gone))
                waiting -= gone
                if waiting <= got.keys():
                    return got

    def take_first_from_live(
        self, kind: str, round: int, attempt: int, match: Callable[[Message], bool], deadline: float,
        awaited: Callable[[], set[str]], watch: AbsenceWatch, stop: threading.Event | None = None,
        check_s: float = ABSENCE_CHECK_S,
    ) -> tuple[Message | None, set[str]]:
        """:meth:`take_first`, but every ``check_s`` it asks ``watch`` which of the senders
        still ``awaited()`` have left the swarm, and returns (None, those) as soon as any has:
        the caller stops waiting for them. (msg, set()) when a message came; (None, set())
        at the deadline."""
        while True:
            step = min(deadline, time.monotonic() + check_s)
            msg = self.take_first(kind, round, attempt, match, step, stop=stop)
            if msg is not None or time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return msg, set()
            gone = watch.gone(awaited())
            if gone:
                log.info("%s of round %d: %s left the swarm; not waiting for them", kind, round, sorted(gone))
                return None, gone

    def take_first(
        self, kind: str, round: int, attempt: int, match: Callable[[Message], bool], deadline: float,
        stop: threading.Event | None = None,
    ) -> Message | None:
        """Wait for the first message under (kind, round, attempt) for which ``match`` is
        true, or until ``deadline`` (time.monotonic()). The message is removed."""
        key = (kind, round, attempt)
        with self._cond:
            while True:
                pending = self._items.get(key)
                if pending:
                    for i, m in enumerate(pending):
                        if match(m):
                            del pending[i]
                            self._release([m])
                            return m
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return None
                self._cond.wait(min(left, 0.25) if stop is not None else left)

    def drain(self, kind: str, round: int, attempt: int = 0) -> list[Message]:
        with self._cond:
            msgs = self._items.pop((kind, round, attempt), [])
            self._release(msgs)
            return msgs

    def drain_before(self, kind: str, round: int) -> list[Message]:
        """Every message of ``kind`` filed for a round before ``round``."""
        with self._cond:
            keys = [k for k in self._items if k[0] == kind and k[1] < round]
            msgs = [m for k in keys for m in self._items.pop(k)]
            self._release(msgs)
            return msgs

    def ahead(self, kind: str, round: int) -> dict[str, Message]:
        """The latest message of ``kind`` each sender filed for a round after ``round``, left
        in place: who has moved past ``round`` (a leader behind its followers sees their
        JOINs for later rounds here)."""
        latest: dict[str, Message] = {}
        with self._cond:
            for (k, r, _), msgs in self._items.items():
                if k != kind or r <= round:
                    continue
                for m in msgs:
                    if m.sender not in latest or m.round > latest[m.sender].round:
                        latest[m.sender] = m
        return latest

    def prune(self, before_round: int) -> None:
        """Drop messages of finished rounds (late parts of a timed-out peer, for example)."""
        with self._cond:
            for key in [k for k in self._items if 0 <= k[1] < before_round]:
                self._release(self._items.pop(key))


class Transport:
    """A node's data-plane endpoint. Thread-safe ``send``; receive through the mailbox."""

    def __init__(
        self,
        node_id: str,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        key: bytes | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_mailbox_bytes: int | None = None,
        send_timeout_s: float = 30.0,
        replay_window_s: float = 300.0,
        shaper: Shaper | None = None,
        schemas: dict[str, type] | None = None,
        max_peer_sockets: int = 512,
        clock_skew_s: float = 2.0,
        node_key: NodeKey | None = None,
        pins: IdentityPins | None = None,
    ):
        """``key``: the swarm key (None: insecure, nothing is signed). ``node_key``: this
        node's own signing key (a fresh one if not given; it matters only with a swarm key).
        ``pins``: which key each node id is bound to, shared with the membership.
        ``max_mailbox_bytes``: unread bytes held for the training thread from all senders
        together (default four times ``max_message_bytes``); see :class:`Mailbox`."""
        self.node_id = node_id
        self.key = key
        self.node_key = node_key or NodeKey.generate()
        self.pins = pins or IdentityPins()
        # sender id -> time.monotonic() of its last accepted message: a peer that reaches
        # this node is not one to pass over (protocols/collective.py)
        self.last_heard: dict[str, float] = {}
        self.max_message_bytes = max_message_bytes
        self.send_timeout_s = send_timeout_s
        self.max_peer_sockets = max_peer_sockets
        self.session = secrets.token_hex(8)
        self.mailbox = Mailbox(max_bytes_per_sender=max_message_bytes, max_total_bytes=max_mailbox_bytes)
        self.bytes_sent = 0  # at the socket
        self.bytes_queued = 0  # when handed to send(): bytes_sent plus what emulation holds or loses
        self.bytes_recv = 0
        self.drops = DropLog()
        self.dropped = self.drops.counts  # reason -> messages dropped
        self._meta = MetaValidator(schemas)
        # messages handed to the socket, by kind and by destination node (or endpoint):
        # what a node really sent, e.g. to check that NoLoCo talks only to its partners
        self.sent_by_kind: dict[str, int] = defaultdict(int)
        self.sent_to: dict[str, int] = defaultdict(int)
        # bytes by kind, sent (at the socket) and received (of messages that passed every
        # check: a forged kind must not add entries)
        self.sent_bytes_by_kind: dict[str, int] = defaultdict(int)
        self.recv_bytes_by_kind: dict[str, int] = defaultdict(int)
        # bytes by kind as ``bytes_queued`` counts them (when handed to send()): what one
        # part of a node sent in a window while its other threads send too
        self.queued_bytes_by_kind: dict[str, int] = defaultdict(int)
        self._handlers: dict[str, Handler] = {}
        self._replay = ReplayGuard(replay_window_s, not_before=time.time() - clock_skew_s)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # at most this many messages queued per connection: past it ZeroMQ stops reading that
        # connection (TCP backpressure on the sender; nothing is dropped), so a flood cannot
        # grow this process without bound
        self._router.setsockopt(zmq.RCVHWM, 1000)
        self._router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        try:
            if port:
                self._router.bind(f"tcp://{listen_host}:{port}")
                bound = port
            else:
                bound = self._router.bind_to_random_port(f"tcp://{listen_host}")
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            self._ctx.term()
            raise ConnectionError(f"cannot listen on tcp://{listen_host}:{port or '*'} ({exc}): pick another port "
                                  f"(node.port / --port; 0 takes any free one)") from None
        self.port = bound
        self.endpoint = f"tcp://{advertise_host or listen_host}:{bound}"
        # least recently used first: reply endpoints come from requests, so their number is
        # bounded here, not by whoever sends requests
        self._peers: OrderedDict[str, tuple[zmq.Socket, threading.Lock]] = OrderedDict()
        self._peers_lock = threading.Lock()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._io_loop, name=f"loco-io-{node_id}", daemon=True)
        self._thread.start()
        # network emulation: messages wait in a heap until the shaper says they leave
        self.shaper = shaper if shaper is not None and shaper.active else None
        self._names: dict[str, str] = {}
        self._delayed: list[tuple[float, int, str, list, str, int]] = []
        self._delayed_cond = threading.Condition()
        self._delay_order = itertools.count()
        if self.shaper is not None:
            self._delay_thread = threading.Thread(target=self._delay_loop, name=f"loco-shaper-{node_id}",
                                                  daemon=True)
            self._delay_thread.start()

    # ----------------------------------------------------------------- sending
    def _socket_for(self, endpoint: str) -> tuple[zmq.Socket, threading.Lock]:
        evicted = []
        with self._peers_lock:
            entry = self._peers.get(endpoint)
            if entry is not None:
                self._peers.move_to_end(endpoint)
            else:
                while len(self._peers) >= self.max_peer_sockets:
                    evicted.append(self._peers.popitem(last=False)[1])
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 10_000)
                sock.setsockopt(zmq.SNDTIMEO, int(self.send_timeout_s * 1000))
                sock.connect(endpoint)
                entry = (sock, threading.Lock())
                self._peers[endpoint] = entry
        for old_sock, lock in evicted:
            with lock:
                old_sock.close(linger=0)
        return entry

    def name_peer(self, endpoint: str, node_id: str) -> None:
        """Tell the shaper which node an endpoint belongs to (per-peer profiles, cuts)."""
        self._names[endpoint] = node_id

    def send(self, endpoint: str, msg: Message) -> bool:
        """Queue ``msg`` for ``endpoint``. Returns False (and logs) if it could not be queued
        within the send timeout. Large tensors are sent without copying: the caller must not
        modify them in place until the receiver has them (loco's collectives guarantee it)."""
        if self._closing.is_set():
            return False
        msg.sender = self.node_id
        msg.session = self.session
        msg.to = endpoint
        sock, lock = self._socket_for(endpoint)
        with lock:
            with self._seq_lock:
                self._seq += 1
                msg.seq = self._seq
            msg.time = time.time()
            frames = encode(msg, self.key, self.node_key)
            nbytes = message_nbytes(frames)
            with self._count_lock:
                self.bytes_queued += nbytes
                self.queued_bytes_by_kind[msg.kind] += nbytes
            if self.shaper is not None:
                deliver = self.shaper.schedule(self._names.get(endpoint, endpoint), nbytes)
                if deliver is None:
                    return True  # lost on the emulated link: the sender cannot tell
                if deliver > time.monotonic():
                    with self._delayed_cond:
                        heapq.heappush(self._delayed, (deliver, next(self._delay_order), endpoint, frames,
                                                       msg.kind, nbytes))
                        self._delayed_cond.notify()
                    return True
            return self._send_now(sock, endpoint, frames, msg.kind, nbytes)

    def _send_now(self, sock: zmq.Socket, endpoint: str, frames: list, kind: str, nbytes: int) -> bool:
        """Hand frames (``nbytes`` on the wire, as send() counted them) to the socket (caller
        holds the socket's lock) and count the bytes."""
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            log.warning("send %s to %s timed out after %.0fs; dropped", kind, endpoint, self.send_timeout_s)
            return False
        except zmq.ZMQError as exc:
            log.warning("send %s to %s failed: %s", kind, endpoint, exc)
            return False
        with self._count_lock:
            self.bytes_sent += nbytes
            self.sent_by_kind[kind] += 1
            self.sent_bytes_by_kind[kind] += nbytes
            self.sent_to[self._names.get(endpoint, endpoint)] += 1
        return True

    def _delay_loop(self) -> None:
        while not self._closing.is_set():
            with self._delayed_cond:
                if not self._delayed:
                    self._delayed_cond.wait(0.1)
                    continue
                due, _, endpoint, frames, kind, nbytes = self._delayed[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._delayed_cond.wait(min(wait, 0.1))
                    continue
                heapq.heappop(self._delayed)
            sock, lock = self._socket_for(endpoint)
            with lock:
                self._send_now(sock, endpoint, frames, kind, nbytes)

    @property
    def open_peer_sockets(self) -> int:
        """Sockets open to peers now (at most ``max_peer_sockets``; least recently used go first)."""
        with self._peers_lock:
            return len(self._peers)

    def forget_peer(self, endpoint: str) -> None:
        """Close the socket to a peer that left: frees anything queued for it."""
        with self._peers_lock:
            entry = self._peers.pop(endpoint, None)
        if entry:
            with entry[1]:
                entry[0].close(linger=0)

    # --------------------------------------------------------------- receiving
    def on(self, kind: str, handler: Handler) -> None:
        """Serve ``kind`` on the I/O thread instead of filing it in the mailbox."""
        self._handlers[kind] = handler

    def file(self, msg: Message) -> None:
        """Put ``msg`` in the mailbox (handlers call this for what they do not answer)."""
        refused = self.mailbox.put(msg)
        if refused:
            self.drops.drop("MailboxFull", f"{msg.kind} refused: {refused}")

    def recv(
        self, kind: str, round: int, attempt: int = 0, sender: str | None = None,
        timeout_s: float = 30.0, stop: threading.Event | None = None,
    ) -> Message | None:
        got = self.mailbox.take(kind, round, attempt, None if sender is None else [sender],
                                time.monotonic() + timeout_s, stop=stop)
        return next(iter(got.values()), None)

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._closing.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            if self._router not in ready:
                continue
            while True:
                try:
                    frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return
                try:
                    self._accept(frames[1:])  # frames[0] is the ROUTER's identity of the peer
                except Exception as exc:  # belt and braces: this thread is the node's only ear
                    self.drops.drop("Error", f"{type(exc).__name__}: {exc}")

    def _accept(self, frames: list) -> None:
        """Verify, check and deliver one message. Nothing a peer sends may end the I/O
        thread: whatever fails is dropped and counted by reason."""
        nbytes = message_nbytes(frames)
        with self._count_lock:
            self.bytes_recv += nbytes
        try:
            msg = decode(frames, self.key, self.max_message_bytes)
        except WireError as exc:
            self.drops.drop(type(exc).__name__, str(exc))
            return
        except Exception as exc:  # a decoder bug must cost one message, not the node
            self.drops.drop("DecodeError", f"{type(exc).__name__}: {exc}")
            return
        if self.key:
            # before the replay check: a message from a member posing as another must not
            # touch the replay state of the one it poses as
            problem = "it names no sender key" if not msg.pub else self.pins.check(msg.sender, msg.pub)
            if problem:
                self.drops.drop("Impersonation", f"{msg.kind[:64]} claiming to be from {msg.sender[:64]}: {problem}")
                return
        if msg.to != self.endpoint:
            self.drops.drop("WrongDestination", f"{msg.kind[:64]} from {msg.sender[:64]} is addressed to "
                            f"{msg.to[:100]!r}, this node is {self.endpoint}")
            return
        problem = self._replay.check(msg)
        if problem:
            self.drops.drop("Replay", f"{msg.kind[:64]} from {msg.sender[:64]}: {problem}")
            return
        try:
            self._meta.check(msg.kind, msg.meta)
        except MetaError as exc:
            self.drops.drop(exc.reason, f"from {msg.sender[:64]}: {exc}")
            return
        with self._count_lock:
            self.recv_bytes_by_kind[msg.kind] += nbytes
        self.last_heard.pop(msg.sender, None)  # re-inserted last: the dict is oldest first
        self.last_heard[msg.sender] = time.monotonic()
        if len(self.last_heard) > 65_536:
            del self.last_heard[next(iter(self.last_heard))]
        handler = self._handlers.get(msg.kind)
        if handler is None:
            self.file(msg)
            return
        try:
            handler(msg)
        except Exception as exc:  # a bad request must never take the I/O thread down
            self.drops.drop("HandlerError", f"handler for {msg.kind} from {msg.sender[:64]} failed: "
                            f"{type(exc).__name__}: {exc}")

    # ---------------------------------------------------------------- shutdown
    def close(self, flush_s: float = 5.0) -> None:
        """Stop, after giving what was already sent a chance to leave: messages the shaper
        still holds (up to ``flush_s``), then up to 1 s in each socket's queue. A node that
        sends its last gossip or reduce part and exits at once must not lose it."""
        if self._closing.is_set():
            return
        deadline = time.monotonic() + flush_s
        with self._delayed_cond:
            while self._delayed and time.monotonic() < deadline:
                self._delayed_cond.wait(0.05)
        self._closing.set()
        self._thread.join(timeout=5)
        if self.shaper is not None:
            self._delay_thread.join(timeout=5)
        with self._peers_lock:
            for sock, lock in self._peers.values():
                with lock:
                    sock.close(linger=1000 if flush_s > 0 else 0)
            self._peers.clear()
        self._router.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
