"""Bandwidth strings, in the grammar ``tc`` reads, so that the in-transport shaper and
``tc``-shaped namespaces (scripts/netns.py) agree on what a setting means.

A number followed by a unit, case-insensitively as in ``tc``:

- bits per second: ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit`` (powers of 1000) and
  ``kibit``, ``mibit``, ``gibit``, ``tibit`` (powers of 1024); ``/s`` may follow (``100mbit/s``);
- BYTES per second, as ``tc`` reads them: ``bps``, ``kbps``, ``mbps``, ``gbps``, ``tbps`` and
  ``kibps`` ... ``tibps`` (so ``100mbps`` is 800 Mbit/s, in ``tc`` and here alike);
- bytes per second with a slash and a capital B: ``B/s``, ``kB/s``/``KB/s``, ``MB/s``,
  ``GB/s``, ``TB/s``, ``KiB/s`` ... ``TiB/s``.

Rejected, with a message: a bare number (``tc`` would read bits; too easy to mean bytes)
and ``b/s`` with a small b (``Mb/s``: bits to some, bytes to others).
"""

from __future__ import annotations

import re

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
           "ki": 1024.0, "mi": 1024.0 ** 2, "gi": 1024.0 ** 3, "ti": 1024.0 ** 4}

GRAMMAR = ("bits: bit, kbit, mbit, gbit (kibit, mibit, ...); bytes as tc reads them: bps, kbps, mbps, gbps; "
           "bytes: B/s, KB/s, MB/s, GB/s")

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"


def parse_bandwidth(text: str) -> float:
    """A bandwidth string -> bits per second: '100mbit' -> 1e8, '100mbps' -> 8e8,
    '25MB/s' -> 2e8. Raises ValueError naming the string for anything else."""
    m = re.fullmatch(rf"\s*{_NUMBER}\s*([A-Za-z/]*)\s*", text)
    if not m:
        raise ValueError(f"bandwidth {text!r}: expected a number and a unit ({GRAMMAR})")
    value, unit = float(m.group(1)), m.group(2)
    if not unit:
        raise ValueError(f"bandwidth {text!r} has no unit: write {m.group(1)}mbit for megabits or "
                         f"{m.group(1)}MB/s for megabytes per second")
    bps = _bits_per_second(unit)
    if bps is None:
        raise ValueError(f"bandwidth {text!r}: unknown unit {unit!r} ({GRAMMAR})")
    if bps == 0.0:
        raise ValueError(f"bandwidth {text!r}: {unit!r} is ambiguous (b: bits or bytes?): write "
                         f"{m.group(1)}{unit[:-3]}bit for bits or {m.group(1)}{unit[:-3].upper()}B/s for bytes "
                         f"per second")
    if value <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive")
    return value * bps


def _bits_per_second(unit: str) -> float | None:
    """Bits per second of one ``unit``; 0.0 for an ambiguous spelling; None if unknown."""
    if unit.endswith("/s"):
        stem = unit[:-2]
        if stem.lower().endswith("bit"):
            prefix = _PREFIX.get(stem[:-3].lower())
            return None if prefix is None else prefix
        if stem.endswith("B"):
            prefix = _PREFIX.get(stem[:-1].lower())
            return None if prefix is None else 8 * prefix
        if stem.endswith("b") and stem[:-1].lower() in _PREFIX:
            return 0.0
        return None
    low = unit.lower()
    if low.endswith("bit"):
        prefix = _PREFIX.get(low[:-3])
        return None if prefix is None else prefix
    if low.endswith("bps"):
        prefix = _PREFIX.get(low[:-3])
        return None if prefix is None else 8 * prefix
    return None
