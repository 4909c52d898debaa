"""Bandwidth strings: one grammar, the one tc reads (checked against tc itself where this
process may make a network namespace)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from loco.node.bandwidth import parse_bandwidth
from loco.node.config import ConfigError, load_config

# spelling -> bits per second
SPELLINGS = {
    "100mbit": 100e6,
    "100Mbit": 100e6,
    "100MBIT": 100e6,
    "100mbit/s": 100e6,
    "100 Mbit/s": 100e6,
    "1gbit": 1e9,
    "3Gbit": 3e9,
    "2.5kbit": 2.5e3,
    "1kibit": 1024,
    "1mibit": 1024 ** 2,
    "800bit": 800,
    "100mbps": 800e6,  # bytes per second, as tc reads it
    "100Mbps": 800e6,
    "12.5MBps": 100e6,
    "2.5KBps": 20e3,
    "1kibps": 8 * 1024,
    "25MB/s": 200e6,
    "25 MB/s": 200e6,
    "1KB/s": 8e3,
    "1kB/s": 8e3,
    "1GB/s": 8e9,
    "1MiB/s": 8 * 1024 ** 2,
    "10B/s": 80,
    "1e3kbit": 1e6,
}

# spelling -> what the message must say
REJECTED = {
    "100Mb/s": "ambiguous",
    "100mb/s": "ambiguous",
    "100kb/s": "ambiguous",
    "1000": "has no unit",
    "100 megabits": "unknown unit",
    "fast": "expected a number",
    "0mbit": "must be positive",
    "100mbitps": "unknown unit",
}


@pytest.mark.parametrize("text,bps", SPELLINGS.items())
def test_spellings(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps, rel=1e-12)


@pytest.mark.parametrize("text,message", REJECTED.items())
def test_rejected_spellings_say_why(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_bandwidth(text)
    assert text in str(err.value) and "\n" not in str(err.value)


def test_a_config_with_an_ambiguous_bandwidth_names_the_key():
    with pytest.raises(ConfigError, match=r"network.bandwidth.*ambiguous"):
        load_config(overrides=["network.bandwidth='100Mb/s'"])


def _tc_readable() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("tc") is not None


@pytest.mark.skipif(not _tc_readable(), reason="needs root, ip and tc to make a namespace with a tbf qdisc")
def test_tc_reads_every_spelling_it_accepts_as_loco_does():
    ns = f"loco-bw-{os.getpid()}"
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True)  # noqa: E731
    try:
        run("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace: {exc.stderr.strip()}")
    try:
        run("ip", "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        run("ip", "-n", ns, "link", "set", "va", "up")
        checked = 0
        for text, bps in SPELLINGS.items():
            if "/" in text or " " in text:  # loco's own byte spelling, which tc does not read
                continue
            run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "va", "root", "tbf",
                "rate", text, "burst", "32kb", "latency", "50ms")
            shown = json.loads(run("ip", "netns", "exec", ns, "tc", "-j", "qdisc", "show", "dev", "va").stdout)
            rate_bytes = shown[0]["options"]["rate"]  # tc keeps bytes per second (whole ones)
            assert rate_bytes == pytest.approx(bps / 8, abs=1), text
            assert rate_bytes * 8 == pytest.approx(parse_bandwidth(text), abs=8), text
            checked += 1
        assert checked >= 15
        # and tc refuses what loco calls ambiguous
        bad = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "va", "root", "tbf",
                              "rate", "100Mb/s", "burst", "32kb", "latency", "50ms"], capture_output=True, text=True)
        assert bad.returncode != 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
