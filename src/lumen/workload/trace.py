"""Trace files: the Azure LLM inference trace CSV format and JSONL.

Formats (detected from the file's first non-blank character / header):

- CSV with header ``TIMESTAMP,ContextTokens,GeneratedTokens`` (the Azure LLM inference trace
  2023 as published), TIMESTAMP either a datetime (``2023-11-16 18:15:46.6805900``) or a
  number of seconds. Also accepted: header ``arrival,prompt_tokens,output_tokens``.
- JSONL: one object per line with ``"arrival"`` or ``"timestamp"`` (seconds, or an ISO
  datetime string), ``"prompt_tokens"`` and ``"output_tokens"``. Blank lines are skipped.

Requests are sorted by time (stable), times are rebased so the first request arrives at 0, and
then multiplied by ``time_scale`` (0.5 replays the trace twice as fast). ``req_id`` is the
position after sorting.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import UTC, datetime
from pathlib import Path

from .spec import RequestSpec

__all__ = ["TraceFormatError", "load_trace"]

_CSV_COLUMNS = (
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("arrival", "prompt_tokens", "output_tokens"),
)


class TraceFormatError(ValueError):
    """The trace file cannot be parsed; the message names the file and line."""


def _parse_time(value: object, where: str) -> float:
    if isinstance(value, bool):
        raise TraceFormatError(f"{where}: time must be a number or datetime string, got {value!r}")
    if isinstance(value, int | float):
        t = float(value)
    elif isinstance(value, str):
        s = value.strip()
        try:
            t = float(s)
        except ValueError:
            try:
                # fromisoformat accepts the trace's 7 fractional digits on Python >= 3.11.
                dt = datetime.fromisoformat(s)
                # Naive times are read as UTC so that no local DST shift enters the gaps.
                t = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
            except ValueError:
                raise TraceFormatError(f"{where}: cannot parse time {value!r}") from None
    else:
        raise TraceFormatError(f"{where}: time must be a number or datetime string, got {value!r}")
    if not math.isfinite(t):
        raise TraceFormatError(f"{where}: time is not finite: {value!r}")
    return t


def _parse_tokens(value: object, name: str, where: str) -> int:
    if isinstance(value, bool):
        raise TraceFormatError(f"{where}: {name} must be an integer, got {value!r}")
    try:
        f = float(value) if isinstance(value, str) else value
        n = int(f)  # type: ignore[arg-type]
        if n != f:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise TraceFormatError(f"{where}: {name} must be an integer, got {value!r}") from None
    if n < 1:
        raise TraceFormatError(f"{where}: {name} must be >= 1, got {n}")
    return n


def _read_csv(path: Path, max_rows: int | None) -> list[tuple[float, int, int]]:
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(f"{path}: empty file")
        header = [h.strip().lstrip("\ufeff") for h in header]
        for cols in _CSV_COLUMNS:
            if all(c in header for c in cols):
                idx = [header.index(c) for c in cols]
                break
        else:
            expected = " or ".join(",".join(c) for c in _CSV_COLUMNS)
            raise TraceFormatError(f"{path}: CSV header {','.join(header)!r} lacks columns {expected}")
        for lineno, rec in enumerate(reader, start=2):
            if not rec or all(not c.strip() for c in rec):
                continue
            where = f"{path}:{lineno}"
            if len(rec) < len(header):
                raise TraceFormatError(f"{where}: expected {len(header)} columns, got {len(rec)}")
            rows.append(
                (
                    _parse_time(rec[idx[0]], where),
                    _parse_tokens(rec[idx[1]], cols[1], where),
                    _parse_tokens(rec[idx[2]], cols[2], where),
                )
            )
            if max_rows is not None and len(rows) >= max_rows:
                break
    return rows


def _read_jsonl(path: Path, max_rows: int | None) -> list[tuple[float, int, int]]:
    rows: list[tuple[float, int, int]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TraceFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            key = "arrival" if "arrival" in obj else "timestamp" if "timestamp" in obj else None
            if key is None:
                raise TraceFormatError(f"{where}: missing 'arrival' (or 'timestamp')")
            for k in ("prompt_tokens", "output_tokens"):
                if k not in obj:
                    raise TraceFormatError(f"{where}: missing {k!r}")
            rows.append(
                (
                    _parse_time(obj[key], where),
                    _parse_tokens(obj["prompt_tokens"], "prompt_tokens", where),
                    _parse_tokens(obj["output_tokens"], "output_tokens", where),
                )
            )
            if max_rows is not None and len(rows) >= max_rows:
                break
    return rows


def load_trace(
    path: str | Path, time_scale: float = 1.0, max_requests: int | None = None
) -> list[RequestSpec]:
    """Load a trace file (Azure CSV or JSONL; see module doc) into RequestSpecs.

    ``max_requests`` keeps the first N requests of the file (files are expected in time order,
    as the Azure trace is). Raises FileNotFoundError for a missing file and TraceFormatError
    (a ValueError) naming the file and line for anything malformed.
    """
    p = Path(path)
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time_scale must be positive and finite, got {time_scale!r}")
    if max_requests is not None and max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    if not p.is_file():
        raise FileNotFoundError(f"trace file not found: {p}")
    with p.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if not head:
        raise TraceFormatError(f"{p}: empty file")
    rows = _read_jsonl(p, max_requests) if head[:1] == b"{" else _read_csv(p, max_requests)
    if not rows:
        raise TraceFormatError(f"{p}: no requests in file")
    rows.sort(key=lambda r: r[0])  # stable: equal timestamps keep file order
    t0 = rows[0][0]
    return [RequestSpec(i, (t - t0) * time_scale, pt, ot) for i, (t, pt, ot) in enumerate(rows)]
