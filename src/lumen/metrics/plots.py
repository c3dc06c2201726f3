"""PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .summary import NO_FAILURE, PolicyAggregate, RunSummary

__all__ = ["plot_ttft_timeline", "plot_policy_bars", "NO_FAILURE"]
# Stable colours per policy so both plots (and every report) agree.
_ORDER = ("stop-restart", "fixed-ckpt", "lumen", "lumen-no-spec", "spec-only")
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _color(policy: str, others: list[str]) -> str:
    if policy == NO_FAILURE:
        return "black"
    if policy in _ORDER:
        return _PALETTE[_ORDER.index(policy)]
    if policy not in others:
        others.append(policy)
    return _PALETTE[(len(_ORDER) + others.index(policy)) % len(_PALETTE)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _mean_series(runs: Sequence[RunSummary], baseline: bool = False) -> tuple[np.ndarray, np.ndarray]:
    # Repeats of one policy share the workload size and rate, so window k means the same
    # thing in each; average window-by-window over the windows all repeats have.
    n = min(len(r.window_mid_arrival) for r in runs)
    x = np.nanmean([r.window_mid_arrival[:n] for r in runs], axis=0) if n else np.array([])
    key = "baseline_window_mean_ttft" if baseline else "window_mean_ttft"
    with warnings.catch_warnings():
        # a window where no request got a token in any repeat is NaN (a gap in the line), not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        ys = np.array([getattr(r, key)[:n] for r in runs], dtype=np.float64)
        y = np.nanmean(ys, axis=0) if n else np.array([])
    return x, y


def plot_ttft_timeline(summaries: Sequence[RunSummary], path: str | Path, title: str | None = None) -> Path:
    """Mean TTFT per window (y, ms) at each window's mid arrival time (x, s).

    One line per policy (averaged over repeats) plus the no-failure reference (taken from the
    runs' own baseline series, or from runs whose policy is ``"no-failure"``); failure times
    are dashed vertical lines.
    """
    plt = _pyplot()
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.policy, []).append(s)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    if NO_FAILURE not in groups and summaries:
        x, y = _mean_series(summaries, baseline=True)
        ax.plot(x, y * 1e3, color="black", lw=1.5, ls=":", label=NO_FAILURE)
    others: list[str] = []
    for policy, runs in groups.items():
        x, y = _mean_series(runs)
        style = {"lw": 1.5, "ls": ":"} if policy == NO_FAILURE else {"lw": 1.8}
        ax.plot(x, y * 1e3, marker=".", label=policy, color=_color(policy, others), **style)
    # The k-th failure of every run comes from the same plan entry: mark its mean time once.
    n_fail = max((len(s.failure_times) for s in summaries), default=0)
    failures = [
        float(np.mean([s.failure_times[k] for s in summaries if len(s.failure_times) > k])) for k in range(n_fail)
    ]
    for i, t in enumerate(failures):
        ax.axvline(t, color="red", ls="--", lw=1, label="failure" if i == 0 else None)
    ax.set_xlabel("arrival time (s), window midpoint")
    ax.set_ylabel("mean TTFT per window (ms)")
    window = summaries[0].window if summaries else 0
    ax.set_title(title or f"TTFT around the failure (windows of {window} requests, mean over repeats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def plot_policy_bars(aggregates: Sequence[PolicyAggregate], path: str | Path, title: str | None = None) -> Path:
    """Bars per policy with 95% CI whiskers: recovery time, affected mean TTFT, affected mean TPOT."""
    plt = _pyplot()
    panels = (
        ("recovery time (s)", "recovery_time_s", 1.0),
        ("failure-affected mean TTFT (ms)", "affected_ttft_mean", 1e3),
        ("failure-affected mean TPOT (ms)", "affected_tpot_mean", 1e3),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    names = [a.policy for a in aggregates]
    xs = np.arange(len(names))
    others: list[str] = []
    colors = [_color(n, others) for n in names]
    for ax, (label, metric, scale) in zip(axes, panels, strict=True):
        means = [a.metrics[metric].mean * scale for a in aggregates]
        errs = [a.metrics[metric].half_width * scale for a in aggregates]
        heights = [m if math.isfinite(m) else 0.0 for m in means]
        yerr = [e if math.isfinite(e) else 0.0 for e in errs]
        ax.bar(xs, heights, yerr=yerr, capsize=5, color=colors)
        for x, m in zip(xs, means, strict=True):
            if not math.isfinite(m):
                ax.annotate("n/a", (x, 0), ha="center", va="bottom")
        ax.set_xticks(xs, names, rotation=20)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "per policy, mean with 95% CI (Student t) over repeats")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
