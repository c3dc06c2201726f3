"""Report writers: JSON, CSV and a rich table."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

from .summary import METRICS, PolicyAggregate, RunSummary, _json_safe

__all__ = ["write_json", "write_runs_csv", "write_aggregate_csv", "print_table", "format_ci", "render_table"]

# Scalar RunSummary fields written to the per-run CSV (lists/dicts go to JSON only).
_RUN_COLUMNS = (
    "policy", "seed", "n_requests", "n_completed", "n_errors", "n_interrupted", "recovery_time_s",
    "recovered", "degraded", "affected_start_s", "affected_end_s", "affected_requests",
    "affected_ttft_mean", "affected_ttft_p99", "affected_tpot_mean", "affected_tpot_p99",
    "interrupted_tpot_mean", "interrupted_tpot_p99", "ttft_mean", "ttft_p99", "tpot_mean", "tpot_p99",
    "e2e_mean", "baseline_ttft_mean", "baseline_tpot_mean", "duration_s", "output_tokens_per_s", "window",
    "outage_end_s", "outage_ttft_mean", "outage_tpot_mean", "baseline_outage_ttft_mean", "baseline_outage_tpot_mean",
    "outage_ttft_vs_baseline", "outage_tpot_vs_baseline",
)  # fmt: skip


def write_json(
    path: str | Path,
    summaries: Sequence[RunSummary],
    aggregates: Sequence[PolicyAggregate],
    meta: dict | None = None,
) -> Path:
    """One JSON document: ``{"meta", "aggregates", "runs"}``; NaN is written as null."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": _json_safe(meta or {}),
        "aggregates": [a.to_dict() for a in aggregates],
        "runs": [s.to_dict() for s in summaries],
    }
    p.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return p


def _cell(v) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    if isinstance(v, list):
        return ";".join(f"{x:g}" for x in v)
    return v


def write_runs_csv(path: str | Path, summaries: Sequence[RunSummary]) -> Path:
    """One row per run; empty cells where a value is undefined."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*_RUN_COLUMNS, "failure_times"])
        for s in summaries:
            w.writerow([_cell(getattr(s, c)) for c in _RUN_COLUMNS] + [_cell(s.failure_times)])
    return p


def write_aggregate_csv(path: str | Path, aggregates: Sequence[PolicyAggregate]) -> Path:
    """One row per policy: repeats, recovered count, and ``<metric>_mean``, ``_ci95``, ``_n``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        header = ["policy", "repeats", "recovered"]
        for m in METRICS:
            header += [f"{m}_mean", f"{m}_ci95", f"{m}_n"]
        w.writerow(header)
        for a in aggregates:
            row: list = [a.policy, a.repeats, a.recovered]
            for m in METRICS:
                ci = a.metrics[m]
                row += [_cell(ci.mean), _cell(ci.half_width), ci.n]
            w.writerow(row)
    return p


def format_ci(mean: float, half_width: float, scale: float = 1.0, digits: int = 2) -> str:
    """``"12.34 ± 0.56"``; ``"-"`` when the mean is undefined; no ± part for a single run."""
    if not math.isfinite(mean):
        return "-"
    s = f"{mean * scale:.{digits}f}"
    if math.isfinite(half_width):
        s += f" ± {half_width * scale:.{digits}f}"
    return s


# (header, metric, scale, digits): the comparison the paper makes; overall means are in the CSV/JSON.
_TABLE = (
    ("recovery s", "recovery_time_s", 1.0, 1),
    ("aff. TTFT ms", "affected_ttft_mean", 1e3, 0),
    ("aff. TTFT P99", "affected_ttft_p99", 1e3, 0),
    ("aff. TPOT ms", "affected_tpot_mean", 1e3, 1),
    ("aff. TPOT P99", "affected_tpot_p99", 1e3, 1),
    ("intr. TPOT ms", "interrupted_tpot_mean", 1e3, 1),
    # TTFT while the killed worker was gone, over the no-failure run's: <= 1 means it cost no capacity
    ("outage TTFT ×", "outage_ttft_vs_baseline", 1.0, 2),
    ("errors", "n_errors", 1.0, 0),
)


def render_table(aggregates: Sequence[PolicyAggregate], title: str | None = None):
    """A rich Table: one row per policy, each cell mean ± 95% CI half-width over repeats.

    "aff." = over the failure-affected period; "intr." = interrupted requests; "runs" shows
    recovered/total (a run that never recovered has a censored recovery time).
    """
    from rich.table import Table

    t = Table(title=title or "lumen bench: mean ± 95% CI (Student t) over repeats")
    t.add_column("policy", style="bold", no_wrap=True)
    t.add_column("runs rec/all", justify="right")
    for header, *_ in _TABLE:
        t.add_column(header, justify="right")
    for a in aggregates:
        cells = [format_ci(a.metrics[m].mean, a.metrics[m].half_width, sc, d) for _, m, sc, d in _TABLE]
        t.add_row(a.policy, f"{a.recovered}/{a.repeats}", *cells)
    return t


def print_table(aggregates: Sequence[PolicyAggregate], console=None, title: str | None = None) -> None:
    from rich.console import Console

    (console or Console()).print(render_table(aggregates, title))
