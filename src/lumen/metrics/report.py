"""Report writers: JSON, CSV and a rich table."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from .summary import METRICS, PolicyAggregate, RunSummary, _json_safe

__all__ = [
    "write_json", "write_runs_csv", "write_aggregate_csv", "print_table", "format_ci", "render_table",
    "report_console", "print_fitted", "PIPE_WIDTH", "capacity_warnings", "render_per_worker_table",
]  # fmt: skip

# Scalar RunSummary fields written to the per-run CSV (lists/dicts go to JSON only).
_RUN_COLUMNS = (
    "policy", "seed", "n_requests", "n_completed", "n_errors", "n_interrupted", "recovery_time_s",
    "recovered", "degraded", "affected_start_s", "affected_end_s", "affected_requests",
    "affected_ttft_mean", "affected_ttft_p99", "affected_tpot_mean", "affected_tpot_p99",
    "interrupted_tpot_mean", "interrupted_tpot_p99", "ttft_mean", "ttft_p99", "tpot_mean", "tpot_p99",
    "e2e_mean", "baseline_ttft_mean", "baseline_tpot_mean", "duration_s", "output_tokens_per_s", "window",
    "outage_end_s", "outage_ttft_mean", "outage_tpot_mean", "baseline_outage_ttft_mean", "baseline_outage_tpot_mean",
    "outage_ttft_vs_baseline", "outage_tpot_vs_baseline", "pre_failure_ttft_vs_baseline", "capacity_lost",
)  # fmt: skip


def write_json(
    path: str | Path,
    summaries: Sequence[RunSummary],
    aggregates: Sequence[PolicyAggregate],
    meta: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """One JSON document: ``{"meta", "aggregates", "runs"}`` plus the top-level keys of ``extra``
    (the bench's ``capacity_check`` and ``no_capacity_loss_runs``); NaN is written as null."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": _json_safe(meta or {}),
        **{k: _json_safe(v) for k, v in (extra or {}).items()},
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


def render_overhead_table(rows: Sequence[dict], reference_policy: str = "stop-restart"):
    """A rich Table of lumen.metrics.summary.failure_free_overhead: each policy's mean TTFT and TPOT
    without a failure over the reference policy's on the same seeds (mean ± 95% CI of the ratios)."""
    from rich.table import Table

    t = Table(title=f"no failure: each policy over {reference_policy}, same seeds (mean ± 95% CI)")
    for header in ("policy", "seeds", "TTFT ×", "TPOT ×", "TTFT ms", "TPOT ms"):
        t.add_column(header, justify="left" if header == "policy" else "right", no_wrap=header == "policy")
    for r in rows:
        ttft, tpot = r["ttft_mean_vs_reference"], r["tpot_mean_vs_reference"]
        t.add_row(r["policy"], str(len(r["seeds"])),
                  format_ci(_num(ttft["mean"]), _num(ttft["ci95"]), digits=3),
                  format_ci(_num(tpot["mean"]), _num(tpot["ci95"]), digits=3),
                  format_ci(_num(r["ttft_mean_s"]), math.nan, 1e3, 0), format_ci(_num(r["tpot_mean_s"]), math.nan, 1e3, 1))
    return t


def render_targets_table(rows: Sequence[dict]):
    """A rich Table of lumen.metrics.targets.aggregate_targets: per policy, where its interrupted
    requests went (the busiest target's share of them and of their tokens; 1/N of the survivors is
    an even spread, 1.0 all on one worker) and how many were restored rather than recomputed."""
    from rich.table import Table

    t = Table(title="where the interrupted requests went: the busiest target's share (mean ± 95% CI over runs)")
    for header in ("policy", "runs", "requests", "restored", "targets", "top share (requests)", "top share (tokens)"):
        t.add_column(header, justify="left" if header == "policy" else "right", no_wrap=header == "policy")
    for r in rows:
        t.add_row(r["policy"], str(r["runs"]), str(r["requests"]), f"{100 * r['restored_fraction']:.0f}%",
                  f"{r['mean_targets']:.1f}",
                  format_ci(r["top_request_share"], r["top_request_share_ci"], digits=2),
                  format_ci(r["top_token_share"], r["top_token_share_ci"], digits=2))
    return t


def render_per_worker_table(summaries: Sequence[RunSummary]):
    """A rich Table of the failure runs' ``per_worker`` figures (lumen.metrics.per_worker): per run and
    worker, requests and mean TTFT and TPOT by arrival before the kill, until the killed worker served
    again, and after. None where no run has them (no failure, or a server that does not name workers)."""
    from rich.table import Table

    runs = [s for s in summaries if s.per_worker.get("workers")]
    if not runs:
        return None
    t = Table(title="each worker by phase of arrival: TTFT to the first token's worker, TPOT to the last's "
                    "(one-worker, uninterrupted)")
    for header in ("run", "kill..back s", "worker", "requests by phase", "TTFT ms before", "kill..back", "after",
                   "TPOT ms before", "kill..back", "after"):
        t.add_column(header, justify="left" if header in ("run", "worker") else "right", no_wrap=True)
    for s in runs:
        pw = s.per_worker
        kill, back = (_num(x) for x in pw["bounds_s"])
        bounds = f"{kill:.1f}..{back:.1f}" if math.isfinite(back) else f"{kill:.1f}..never"
        for i, w in enumerate(pw["workers"]):
            t.add_row(f"{s.policy} seed {s.seed}" if i == 0 else "", bounds if i == 0 else "",
                      f"{w['worker']}{' (failed)' if w['failed'] else ''}", "/".join(str(n) for n in w["n"]),
                      *(format_ci(_num(x), math.nan, 1e3, 0) for x in w["ttft_mean"]),
                      *(format_ci(_num(x), math.nan, 1e3, 1) for x in w["tpot_mean"]),
                      end_section=i == len(pw["workers"]) - 1)
    return t


def _num(v) -> float:
    """A JSON-safe figure (None for NaN) back to a float."""
    return math.nan if v is None else float(v)


def print_table(aggregates: Sequence[PolicyAggregate], console=None, title: str | None = None) -> None:
    print_fitted(console or report_console(), render_table(aggregates, title))


# Where the output is not a terminal (a file, a pipe, a CI log) rich falls back to 80 columns (or
# $COLUMNS) and squeezes the bench table into wrapped cells and "…"-cut headers. Nothing reads such
# output at a fixed width, so there the console starts this wide (the bench table of all five
# policies measures about 160 columns) and print_fitted widens it further to what a table needs.
PIPE_WIDTH = 160
_MAX_FIT = 1000  # never render wider than this, whatever a table claims to need


def _on_terminal(console) -> bool:
    # The file's own isatty, not console.is_terminal: FORCE_COLOR (set by many CI runners) makes
    # rich treat a log file as a terminal, and a log file has no width to respect.
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed file
        return False


def report_console(file=None, **kwargs):
    """A rich Console for bench/demo/chaos reports, right on a terminal and in a pipe.

    On a terminal it is a plain ``Console(file=file, **kwargs)`` (the terminal's width). Where
    ``file`` (default stdout) is not a terminal and neither ``width`` nor ``$COLUMNS`` says
    otherwise, the width is ``PIPE_WIDTH``; print tables with :func:`print_fitted` so that a wider
    one is still printed whole.
    """
    from rich.console import Console

    console = Console(file=file, **kwargs)
    if kwargs.get("width") is None and not _on_terminal(console) and not os.environ.get("COLUMNS", "").isdigit():
        console.width = max(console.width, PIPE_WIDTH)
    return console


def print_fitted(console, renderable) -> None:
    """``console.print(renderable)``, but where the console does not write to a terminal, at the
    renderable's full measured width (up to 1000 columns) when that is wider than the console:
    a table in a log is then never wrapped into its cells or cut with "…"."""
    if _on_terminal(console):
        console.print(renderable)
        return
    from rich.measure import Measurement

    need = min(Measurement.get(console, console.options.update_width(_MAX_FIT), renderable).maximum, _MAX_FIT)
    old = console.width
    if need <= old:
        console.print(renderable)
        return
    console.width = need
    try:
        console.print(renderable)
    finally:
        console.width = old


def _ratio_text(r) -> str:
    return f"{r:.2f}" if isinstance(r, (int, float)) and math.isfinite(r) else "unknown"


def capacity_warnings(check: dict) -> list[str]:
    """Rich-markup lines to print after the bench table for a :func:`check_capacity` result: a red
    warning naming the seeds whose failure cost no capacity, yellow notes for the seeds judged
    without the reference policy and those the check could not be made for; [] when all is well."""
    from rich.markup import escape

    ref = check.get("reference_policy", "stop-restart")
    seeds = {d["seed"]: d for d in check.get("seeds", [])}
    lines = []

    def judged(seed: int) -> str:
        d = seeds[seed]
        return ", ".join(f"{p} {_ratio_text(d['outage_ttft_vs_baseline'].get(p))}" for p in d["basis"])

    if check.get("no_capacity_loss_seeds"):
        which = "; ".join(f"seed {s} (outage TTFT × {judged(s)})" for s in check["no_capacity_loss_seeds"])
        lines.append(escape(
            f"WARNING: the failure cost no capacity in {which}: requests arriving while the killed worker was "
            "gone were no slower than without the failure, so the surviving workers absorbed its share (workers "
            "sharing one device?). No recovery comparison from these runs means anything (DESIGN.md §5); they "
            "are listed under no_capacity_loss_runs in results.json."))
        lines[-1] = f"[bold red]{lines[-1]}[/]"
    if check.get("within_noise_seeds"):
        which = "; ".join(f"seed {s} (outage TTFT × {judged(s)}; before the failure "
                          + ", ".join(f"{p} {_ratio_text(r)}" for p, r in seeds[s]["pre_failure_ttft_vs_baseline"].items()
                                      if r is not None) + ")"
                          for s in check["within_noise_seeds"])
        lines.append("[yellow]" + escape(
            f"the capacity loss is within the run-to-run noise in {which}: before the failure, serving the same "
            "requests, the runs already differed by as much, so these seeds do not show a loss of capacity beyond "
            "chance and a recovery comparison from them is weak (DESIGN.md §5)") + "[/]")
    others = [s for s, d in seeds.items() if d["basis"] and not d["basis_is_reference"]]
    if others:
        lines.append("[yellow]" + escape(
            f"capacity check without {ref} (not run, or its outage unknown) for "
            + "; ".join(f"seed {s}: judged from {judged(s)}" for s in others)
            + f" - a policy that recovers well can hide a loss of capacity that {ref} would show") + "[/]")
    if check.get("unchecked_seeds"):
        lines.append("[yellow]" + escape(
            "capacity check could not be made for seed(s) " + ", ".join(map(str, check["unchecked_seeds"]))
            + ": no killed worker's outage was measured (no SIGKILL injected, or the cluster did not report when "
            "the worker served again), so nothing here shows that the failure cost capacity (DESIGN.md §5)") + "[/]")
    return lines


# (metric, label, unit scale, unit) compared against stop-restart in the verdict after the bench table
_VERDICT_METRICS = (("recovery_time_s", "recovery time", 1.0, "s"), ("affected_ttft_mean", "affected TTFT", 1e3, "ms"),
                    ("affected_tpot_mean", "affected TPOT", 1e3, "ms"))


def paper_verdict(aggregates, check: dict, reference: str = "stop-restart", policy: str = "lumen") -> list[str]:
    """Plain lines saying whether `policy` beat `reference` as the paper says it does (shorter recovery,
    lower failure-affected TTFT and TPOT), figure by figure, or why no such comparison can be read off
    these runs; [] where either policy was not run."""
    by = {a.policy: a for a in aggregates}
    if policy not in by or reference not in by:
        return []
    if check.get("no_capacity_loss_seeds"):
        return [f"verdict: none - the failure cost no capacity (above), so {policy} against {reference} "
                "says nothing about recovery"]
    n = by[policy].repeats
    parts, better, overlap = [], [], []
    for key, label, scale, unit in _VERDICT_METRICS:
        ca, cb = by[policy].metrics[key], by[reference].metrics[key]
        a, b = ca.mean, cb.mean
        if not (math.isfinite(a) and math.isfinite(b)) or b <= 0:
            continue
        # with several seeds, a difference inside both 95% CIs ranks nothing
        within = n > 1 and math.isfinite(ca.half_width) and math.isfinite(cb.half_width) \
            and abs(a - b) <= ca.half_width + cb.half_width
        parts.append(f"{label} {a * scale:.4g} vs {b * scale:.4g} {unit} ({a / b - 1:+.0%}"
                     + (", CIs overlap)" if within else ")"))
        better.append(a < b)
        overlap.append(within)
    if not parts:
        return []
    censored = [p for p in (policy, reference) if by[p].recovered < by[p].repeats]
    note = (f"; not recovered within the run: {', '.join(censored)} (its recovery time is a lower bound)"
            if censored else "")
    if check.get("within_noise_seeds"):
        note += ("; the capacity loss is within the run-to-run noise in seed(s) "
                 + ", ".join(map(str, check["within_noise_seeds"])) + " (above): weak evidence either way")
    if n == 1:
        # identical one-seed demos on the 2-core box differed by tens of percent (docs/benchmarks.md)
        note += "; one seed ranks nothing (identical runs differ by tens of percent): --repeats 3 gives CIs"
    head = ("no ranking, every 95% CI overlaps: " if all(overlap) else
            "as the paper reports: " if all(better) else
            "not what the paper reports: " if not any(better) else "mixed: ")
    return [f"verdict ({n} seed{'s' if n > 1 else ''}): {policy} against {reference}, {head}"
            + ", ".join(parts) + note]
