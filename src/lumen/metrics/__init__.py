"""Metrics: TTFT/TPOT, the paper's recovery time, confidence intervals, reports and plots.

Shared by ``lumen.bench`` and ``lumen.sim`` so both measure the same way (DESIGN.md §6).
"""

from .plots import NO_FAILURE, plot_policy_bars, plot_ttft_timeline
from .records import RequestRecord, e2e, mean, p99, percentile, tpot, ttft
from .recovery import RecoveryPeriod, recovery_period
from .report import format_ci, print_table, render_table, write_aggregate_csv, write_json, write_runs_csv
from .summary import CI, METRICS, PolicyAggregate, RunSummary, aggregate, ci95, summarize_run

__all__ = [
    "RequestRecord",
    "ttft",
    "tpot",
    "e2e",
    "mean",
    "p99",
    "percentile",
    "RecoveryPeriod",
    "recovery_period",
    "RunSummary",
    "summarize_run",
    "ci95",
    "CI",
    "METRICS",
    "PolicyAggregate",
    "aggregate",
    "write_json",
    "write_runs_csv",
    "write_aggregate_csv",
    "print_table",
    "render_table",
    "format_ci",
    "plot_ttft_timeline",
    "plot_policy_bars",
    "NO_FAILURE",
]
