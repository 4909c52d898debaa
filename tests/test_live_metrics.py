"""The /metrics endpoint of a node, fed the records a node writes, scraped over HTTP and
read with prometheus_client's own parser."""

from __future__ import annotations

import socket
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loco.node.config import ConfigError, load_config
from loco.node.metrics import MetricsWriter, read_metrics
from loco.node.runtime import open_live_metrics


def _scrape(url: str) -> dict[str, float]:
    with urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


ROUND = {"step": 8, "round": 0, "next_round": 1, "loss": 3.5, "val_loss": 3.6, "status": "ok", "group_size": 2,
         "tokens": 512, "compute_s": 1.0, "comm_s": 0.25, "publish_s": 0.05, "eval_s": 0.1, "checkpoint_s": 0.1,
         "wall_s": 1.5, "round_bytes": 1000}


def test_records_become_prometheus_metrics(tmp_path):
    cfg = load_config(overrides=["node.metrics_port=0"])
    writer = MetricsWriter(tmp_path / "n.jsonl", "n0")
    live = open_live_metrics(cfg, "n0", writer)
    try:
        writer.write("start", step=0, round=0, val_loss=5.0, tokens=0)
        writer.write("train", step=4, round=0, loss=4.0)
        writer.write("outer", time=100.0, **ROUND)
        first = _scrape(live.url)
        writer.write("outer", time=102.0, **(ROUND | {"step": 16, "round": 1, "tokens": 1536, "status": "skipped"}))
        writer.write("resync", step=16, round=2)
        second = _scrape(live.url)
    finally:
        live.close()
        writer.close()
    assert first["loco_node_info{node=n0}"] == 1
    assert (first["loco_step"], first["loco_round"], first["loco_loss"], first["loco_val_loss"]) == (8, 0, 3.5, 3.6)
    assert first["loco_rounds_total{status=ok}"] == 1 and first["loco_tokens_total"] == 512
    assert first["loco_round_part_seconds{part=communication}"] == 0.25
    parts = sum(v for k, v in first.items() if k.startswith("loco_round_part_seconds"))
    assert parts == pytest.approx(first["loco_round_wall_seconds"])
    assert second["loco_step"] == 16 and second["loco_tokens_total"] == 1536
    assert second["loco_tokens_per_second"] == pytest.approx(1024 / 2.0)
    assert second["loco_rounds_total{status=skipped}"] == 1 and second["loco_rounds_total{status=ok}"] == 1
    assert second["loco_events_total{event=resync}"] == 1
    assert len(read_metrics(tmp_path / "n.jsonl")) == 5  # the file has every record as before


def test_off_by_default_and_a_taken_port_is_a_one_line_error(tmp_path):
    writer = MetricsWriter(tmp_path / "n.jsonl", "n0")
    try:
        assert open_live_metrics(load_config(), "n0", writer) is None
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match=rf"node.metrics_port = {port}: cannot listen on 127.0.0.1:{port}"):
                open_live_metrics(load_config(overrides=[f"node.metrics_port={port}"]), "n0", writer)
    finally:
        writer.close()


def test_a_follower_reads_only_what_was_appended_and_waits_for_whole_lines(tmp_path):
    from loco.node.metrics import MetricsFollower

    path = tmp_path / "n.jsonl"
    follower = MetricsFollower(path)
    assert follower.new_records() == []  # no file yet
    writer = MetricsWriter(path, "n0")
    writer.write("start", round=0)
    writer.write("outer", round=0)
    assert [r["event"] for r in follower.new_records()] == ["start", "outer"]
    assert follower.new_records() == []  # nothing new: nothing read again
    with path.open("a") as f:
        f.write('{"event": "outer", "ro')  # a line being written
        f.flush()
        assert follower.new_records() == []
        f.write('und": 1}\n{torn\n')
    assert [r["round"] for r in follower.new_records()] == [1]  # the torn line is skipped
    writer.write("stop", round=2)
    writer.close()
    assert [r["event"] for r in follower.new_records()] == ["stop"]
    path.write_text('{"event": "start"}\n')  # replaced by a shorter file: read from its start
    assert [r["event"] for r in follower.new_records()] == ["start"]
