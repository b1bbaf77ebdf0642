"""Counts and sizes as people read them, for every table the project prints: the studio's, the
command line's and the benchmark's, so that a tiny test model and a 12-billion-parameter one
both read in three digits (48.2 k, 5.71 T) instead of '0.0 G' or '5708.2 G'."""

from __future__ import annotations


def format_count(value: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (k, M, G, T suffixes, three significant digits), with an optional unit."""
    value = float(value)
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def format_bytes(count: float) -> str:
    """Bytes with a binary suffix, e.g. 13.7 GiB."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
