"""A node's live metrics: a Prometheus ``/metrics`` endpoint (``node.metrics_port``).

Fed from the same records as the node's JSONL file (``observe`` each one: step, loss, round
outcomes, the time split of the last round, tokens) and, at each scrape, from the node's
transport (bytes and messages by kind, dropped messages by reason) and its DHT view (peers
seen). Everything lives on a registry of its own, served by prometheus_client's HTTP server
on a thread of its own: nothing global, and several nodes in one process do not collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# a round record's parts of its wall time -> the `part` label of loco_round_part_seconds
ROUND_PARTS = {"compute_s": "compute", "comm_s": "communication", "publish_s": "publish",
               "weights_hash_s": "weights_hash", "eval_s": "evaluation", "checkpoint_s": "checkpoint"}


def _labelled(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(dict(counts).items()):  # (a copy: the I/O thread adds entries)
        family.add_metric([value], n)
    return family


class _TransportCollector(Collector):
    """Reads the transport's counters (and the DHT view) when Prometheus scrapes."""

    def __init__(self, transport: Any, peers: Callable[[], int] | None):
        self.transport = transport
        self.peers = peers

    def collect(self) -> Iterator[Metric]:
        t = self.transport
        yield _labelled("loco_sent_bytes", "Data-plane bytes handed to the socket, by message kind", "kind",
                        t.sent_bytes_by_kind)
        yield _labelled("loco_received_bytes", "Bytes of messages received that passed every check, by message "
                        "kind", "kind", t.recv_bytes_by_kind)
        yield _labelled("loco_sent_messages", "Messages handed to the socket, by kind", "kind", t.sent_by_kind)
        yield _labelled("loco_dropped_messages", "Messages dropped (malformed, forged, replayed, ...), by reason",
                        "reason", t.dropped)
        yield CounterMetricFamily("loco_received_wire_bytes", "All bytes received at the socket, dropped "
                                  "messages included", value=t.bytes_recv)
        if self.peers is not None:
            try:
                count = self.peers()
            except Exception as exc:  # a scrape must answer even while the DHT does not
                log.debug("peers for /metrics: %s", exc)
                return
            yield GaugeMetricFamily("loco_peers", "Other live nodes of the swarm in this node's DHT view",
                                    value=count)


class LiveMetrics:
    """The ``/metrics`` endpoint of one node on ``host:port`` (port 0: the OS chooses;
    ``port`` holds the one bound). ``observe`` takes every record the node writes."""

    def __init__(self, node_id: str, host: str, port: int, public_host: str | None = None):
        """``public_host``: the address others reach it at (``url``; default ``host``)."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = Gauge("loco_node_info", "This node (value 1; its id as a label)", ["node"], registry=r)
        self.info.labels(node=node_id).set(1)
        self.step = Gauge("loco_step", "Inner optimizer steps done", registry=r)
        self.round = Gauge("loco_round", "The last round this node finished", registry=r)
        self.loss = Gauge("loco_loss", "Training loss: the mean of the last train.log_every inner steps", registry=r)
        self.val_loss = Gauge("loco_val_loss", "Validation loss at the last evaluation", registry=r)
        self.tokens = Counter("loco_tokens", "Tokens trained on by this node", registry=r)
        self.tokens_per_s = Gauge("loco_tokens_per_second", "Tokens a second over the last round", registry=r)
        self.rounds = Counter("loco_rounds", "Rounds finished, by outcome", ["status"], registry=r)
        self.group = Gauge("loco_group_size", "Members of the last round's average (this node included)",
                           registry=r)
        self.part = Gauge("loco_round_part_seconds", "Time of the last round by part (they add up to "
                          "loco_round_wall_seconds)", ["part"], registry=r)
        self.wall = Gauge("loco_round_wall_seconds", "Wall time of the last round", registry=r)
        self.round_bytes = Gauge("loco_round_sent_bytes", "Bytes this node sent in the last round (handed to "
                                 "the transport)", registry=r)
        self.events = Counter("loco_events", "Events other than rounds (resync, restored, checkpoint_failed, "
                              "...)", ["event"], registry=r)
        self._tokens_seen: float | None = None
        self._last_round_at: tuple[float, float] | None = None  # (time, tokens) of the last round record
        self._server, self._thread = start_http_server(port, addr=host, registry=r)
        self.host = public_host or host
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def watch(self, transport: Any, peers: Callable[[], int] | None = None) -> None:
        """Also serve ``transport``'s counters and ``peers()`` (live peers seen), read at
        each scrape."""
        self.registry.register(_TransportCollector(transport, peers))

    def observe(self, record: dict[str, Any]) -> None:
        """One record of the node's JSONL stream."""
        event = record.get("event")
        if "step" in record:
            self.step.set(record["step"])
        if event == "train":
            self.loss.set(record["loss"])
        elif event == "start":
            self._set_if(self.val_loss, record.get("val_loss"))
            self._set_if(self.round, record.get("round"))
            self._tokens(record)
        elif event == "outer":
            self._round(record)
        elif event != "stop":
            self.events.labels(event=str(event)).inc()

    def _round(self, record: dict[str, Any]) -> None:
        self.round.set(record["round"])
        self.rounds.labels(status=str(record.get("status", "ok"))).inc()
        self._set_if(self.loss, record.get("loss"))
        self._set_if(self.val_loss, record.get("val_loss"))
        self._set_if(self.group, record.get("group_size"))
        self._set_if(self.wall, record.get("wall_s"))
        self._set_if(self.round_bytes, record.get("round_bytes"))
        for field, part in ROUND_PARTS.items():
            if field in record:
                self.part.labels(part=part).set(record[field])
        self._tokens(record)

    def _tokens(self, record: dict[str, Any]) -> None:
        tokens = record.get("tokens")
        if tokens is None:
            return
        now = record.get("time", time.time())
        if self._tokens_seen is not None and tokens > self._tokens_seen:
            self.tokens.inc(tokens - self._tokens_seen)
        elif self._tokens_seen is None and tokens > 0:
            self.tokens.inc(tokens)  # a resumed node's count from its checkpoint
        if self._last_round_at is not None and now > self._last_round_at[0]:
            self.tokens_per_s.set(max(0.0, tokens - self._last_round_at[1]) / (now - self._last_round_at[0]))
        self._tokens_seen = tokens if self._tokens_seen is None else max(tokens, self._tokens_seen)
        self._last_round_at = (now, tokens)

    @staticmethod
    def _set_if(gauge: Gauge, value: Any) -> None:
        if isinstance(value, (int, float)) and value == value:  # not None, not NaN
            gauge.set(value)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
