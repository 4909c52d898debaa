"""Per-node metrics as JSON lines (schema in README.md, "Metrics")."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a killed node loses nothing
    already written and readers (the swarm's progress view) see records at once."""

    def __init__(self, path: Path, node_id: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self._f = path.open("a", buffering=1)
        self._lock = threading.Lock()  # the daemon writes round records from a thread of their own
        self._sinks: list[Callable[[dict[str, Any]], None]] = []

    def add_sink(self, sink: Callable[[dict[str, Any]], None]) -> None:
        """Also hand every record, once written, to ``sink`` (live metrics)."""
        self._sinks.append(sink)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """``fields`` may set ``time`` (when the event happened, if not now)."""
        record = {"time": time.time(), "node": self.node_id, "event": event, **fields}
        line = json.dumps(record) + "\n"
        with self._lock:
            self._f.write(line)
            for sink in self._sinks:  # in the file's order
                try:
                    sink(record)
                except Exception:  # the record is in the file; a live view must not lose the node
                    log.exception("metrics sink failed on a %s record", event)
        return record

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of one file; a torn last line (node killed mid-write) is skipped."""
    out = []
    with path.open() as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class MetricsFollower:
    """Follows a growing metrics file: each ``new_records()`` returns only the records
    appended since the previous call, reading only the new bytes (a live view that re-read
    whole files every second would cost more the longer a run goes). A line still being
    written waits for its end; a torn line (a node killed mid-write) is skipped."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_records(self) -> list[dict[str, Any]]:
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return []
        with f:
            if f.seek(0, 2) < self._offset:  # the file was replaced by a shorter one: start over
                self._offset, self._partial = 0, b""
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
        return out
