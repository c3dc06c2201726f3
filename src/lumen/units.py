"""Durations as people write them on command lines ("30s", "500ms", "2m", "1h"), shared by every CLI."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(s: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ms|s|min|m|h|)\s*", s)
    if not m:
        raise ValueError(f"bad duration {s!r} (examples: 30s, 500ms, 2m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_mtbf(s: str | None) -> float | None:
    """A mean time between failures: a duration > 0, or 'none' / 'inf' / 'off' (not planned for: None)."""
    if s is None or str(s).strip().lower() in ("none", "inf", "off"):
        return None
    v = parse_duration(str(s))
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"an MTBF must be > 0, got {s!r}")
    return v
