"""Run summaries (one failure run vs its no-failure reference) and repeat aggregation."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from .per_worker import per_worker_phases
from .records import RequestRecord, e2e, mean, p99, tpot, ttft
from .recovery import recovery_period

__all__ = ["RunSummary", "summarize_run", "ci95", "CI", "PolicyAggregate", "aggregate", "METRICS", "check_capacity",
           "NO_FAILURE", "failure_free_label", "is_failure_free", "failure_free_overhead"]

# The reference run's label: the workload without any failure, under the reference policy
NO_FAILURE = "no-failure"


def failure_free_label(policy: str) -> str:
    """The label of `policy`'s run without a failure, beside the reference (which is NO_FAILURE)."""
    return f"{NO_FAILURE}-{policy}"


def is_failure_free(label: str) -> bool:
    """Whether a run's label names a run without a failure (the reference or any policy's)."""
    return label == NO_FAILURE or label.startswith(NO_FAILURE + "-")


@dataclass
class RunSummary:
    """Everything reported about one run. Times in seconds; NaN where undefined.

    ``affected_*``: over the requests of the failure-affected period (NaN when never degraded).
    ``interrupted_tpot_*``: over requests flagged ``interrupted`` that completed.
    ``ttft_mean`` etc.: over all requests of the run.
    ``outage_*``: over the requests arriving between the first failure and ``outage_end_s``, when
    the last killed worker served again; ``baseline_outage_*`` over the same arrivals of the
    no-failure run, and ``outage_*_vs_baseline`` their ratio. Above 1 the failure cost capacity
    while the worker was gone; at or below 1 it did not (workers sharing one GPU: the survivors get
    the dead worker's share), and the recovery time then measures something else.
    ``capacity_lost``: whether the failure cost capacity in this run's seed, as judged by
    :func:`check_capacity` (None: not judged, or no outage measured; always None without a failure).
    ``per_worker``: each worker's count, TTFT and TPOT before the first failure, until ``outage_end_s``
    and after (:func:`lumen.metrics.per_worker.per_worker_phases`); {} without a failure, or where the
    records do not name their workers.
    """

    policy: str
    seed: int
    n_requests: int
    n_completed: int
    n_errors: int
    n_interrupted: int
    recovery_time_s: float
    recovered: bool
    degraded: bool
    affected_start_s: float | None
    affected_end_s: float | None
    affected_requests: int
    affected_ttft_mean: float
    affected_ttft_p99: float
    affected_tpot_mean: float
    affected_tpot_p99: float
    interrupted_tpot_mean: float
    interrupted_tpot_p99: float
    ttft_mean: float
    ttft_p99: float
    tpot_mean: float
    tpot_p99: float
    e2e_mean: float
    baseline_ttft_mean: float
    baseline_tpot_mean: float
    duration_s: float
    output_tokens_per_s: float
    window: int
    failure_times: list[float] = field(default_factory=list)
    outage_end_s: float | None = None
    outage_ttft_mean: float = math.nan
    outage_tpot_mean: float = math.nan
    baseline_outage_ttft_mean: float = math.nan
    baseline_outage_tpot_mean: float = math.nan
    outage_ttft_vs_baseline: float = math.nan
    outage_tpot_vs_baseline: float = math.nan
    # the same ratio before the first failure, where both runs served the same requests: run-to-run noise
    pre_failure_ttft_vs_baseline: float = math.nan
    capacity_lost: bool | None = None
    error_counts: dict[str, int] = field(default_factory=dict)
    # Per-window series for the timeline plot.
    window_mid_arrival: list[float] = field(default_factory=list)
    window_mean_ttft: list[float] = field(default_factory=list)
    baseline_window_mean_ttft: list[float] = field(default_factory=list)
    per_worker: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _json_safe(asdict(self))


def _json_safe(x):
    # JSON has no NaN; null is what every reader understands.
    if isinstance(x, float):
        return None if not math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _error_kind(err: str) -> str:
    # Errors are recorded as "kind: detail" by the bench client; group by kind.
    return err.split(":", 1)[0].strip() or "error"


def summarize_run(
    records: Sequence[RequestRecord],
    baseline_records: Sequence[RequestRecord],
    window: int = 200,
    threshold: float = 0.05,
    settle: int = 3,
    policy: str = "",
    seed: int = 0,
    failure_times: Iterable[float] = (),
    not_before: float | None = None,
    outage_end: float | None = None,
    failed_workers: Iterable[int] = (),
) -> RunSummary:
    """Summarise a run against the no-failure run of the same seeded workload.

    ``window``/``threshold``/``settle``/``not_before`` go to :func:`recovery_period`; ``outage_end``
    (run clock: when the last killed worker served again) bounds the ``outage_*`` figures and the
    ``per_worker`` phases, where ``failed_workers`` (the workers the plan killed) are marked.
    Passing the baseline as ``records`` too gives the no-failure row (recovery time 0).
    """
    period = recovery_period(records, baseline_records, window, threshold, settle, not_before)
    affected_ids = set(period.affected_req_ids)
    affected = [r for r in records if r.req_id in affected_ids]
    interrupted = [r for r in records if r.interrupted]
    completed = [r for r in records if r.error is None and r.finish is not None]
    errors = Counter(_error_kind(r.error) for r in records if r.error is not None)
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finish for r in records if r.finish is not None), default=start)
    duration = max(end - start, 0.0)
    out_tokens = sum(r.output_tokens for r in records)
    failure_times = sorted(float(t) for t in failure_times)
    outage = {}
    if failure_times:
        # requests served their first token before the failure in both runs (so nothing of the failure is in
        # their TTFT: a queued request's can already hold the outage), not interrupted, paired by id
        def first_before(rs: Sequence[RequestRecord]) -> set:
            return {r.req_id for r in rs if r.first_token is not None and r.first_token < failure_times[0]
                    and not r.interrupted and math.isfinite(ttft(r))}

        pre = first_before(records) & first_before(baseline_records)
        outage["pre_failure_ttft_vs_baseline"] = _ratio(mean(ttft(r) for r in records if r.req_id in pre),
                                                        mean(ttft(r) for r in baseline_records if r.req_id in pre))
    if failure_times and outage_end is not None and outage_end > failure_times[0]:
        lo = failure_times[0]

        def during(rs: Sequence[RequestRecord]) -> list[RequestRecord]:
            return [r for r in rs if lo <= r.arrival < outage_end]

        run, base = during(records), during(baseline_records)
        outage.update(outage_end_s=float(outage_end),
                      outage_ttft_mean=mean(ttft(r) for r in run), outage_tpot_mean=mean(tpot(r) for r in run),
                      baseline_outage_ttft_mean=mean(ttft(r) for r in base),
                      baseline_outage_tpot_mean=mean(tpot(r) for r in base))
        outage["outage_ttft_vs_baseline"] = _ratio(outage["outage_ttft_mean"], outage["baseline_outage_ttft_mean"])
        outage["outage_tpot_vs_baseline"] = _ratio(outage["outage_tpot_mean"], outage["baseline_outage_tpot_mean"])
    if failure_times:
        back = outage_end if outage_end is not None and outage_end > failure_times[0] else None
        outage["per_worker"] = per_worker_phases(records, failure_times[0], back, failed_workers)
    return RunSummary(
        policy=policy,
        seed=seed,
        n_requests=len(records),
        n_completed=len(completed),
        n_errors=sum(errors.values()),
        n_interrupted=len(interrupted),
        recovery_time_s=period.recovery_time_s,
        recovered=period.recovered,
        degraded=period.degraded,
        affected_start_s=period.start_time,
        affected_end_s=period.end_time,
        affected_requests=len(affected),
        affected_ttft_mean=mean(ttft(r) for r in affected),
        affected_ttft_p99=p99([ttft(r) for r in affected]),
        affected_tpot_mean=mean(tpot(r) for r in affected),
        affected_tpot_p99=p99([tpot(r) for r in affected]),
        interrupted_tpot_mean=mean(tpot(r) for r in interrupted),
        interrupted_tpot_p99=p99([tpot(r) for r in interrupted]),
        ttft_mean=mean(ttft(r) for r in records),
        ttft_p99=p99([ttft(r) for r in records]),
        tpot_mean=mean(tpot(r) for r in records),
        tpot_p99=p99([tpot(r) for r in records]),
        e2e_mean=mean(e2e(r) for r in records),
        baseline_ttft_mean=mean(ttft(r) for r in baseline_records),
        baseline_tpot_mean=mean(tpot(r) for r in baseline_records),
        duration_s=duration,
        output_tokens_per_s=out_tokens / duration if duration > 0 else math.nan,
        window=window,
        failure_times=failure_times,
        error_counts=dict(sorted(errors.items())),
        window_mid_arrival=period.window_mid_arrival,
        window_mean_ttft=period.window_mean_ttft,
        baseline_window_mean_ttft=period.baseline_mean_ttft,
        **outage,
    )


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def ci95(samples: Iterable[float]) -> tuple[float, float]:
    """(mean, half-width) of the Student-t 95% confidence interval of the mean.

    Non-finite samples are dropped. No samples: (NaN, NaN); one sample: (x, NaN) since the
    spread is unknown. Otherwise half-width = t_{0.975, n-1} · s / √n with s the sample standard
    deviation (ddof=1), identical to ``scipy.stats.t.interval(0.95, n-1, loc=mean, scale=sem)``.
    """
    a = np.asarray(list(samples), dtype=np.float64)
    a = a[np.isfinite(a)]
    n = a.size
    if n == 0:
        return math.nan, math.nan
    m = float(a.mean())
    if n == 1:
        return m, math.nan
    sem = float(a.std(ddof=1)) / math.sqrt(n)
    return m, float(stats.t.ppf(0.975, n - 1)) * sem


@dataclass(frozen=True)
class CI:
    mean: float
    half_width: float
    n: int  # finite samples behind the interval

    def to_dict(self) -> dict:
        return _json_safe({"mean": self.mean, "ci95": self.half_width, "n": self.n})


# The RunSummary fields that get a confidence interval across repeats.
METRICS: tuple[str, ...] = (
    "recovery_time_s",
    "affected_ttft_mean",
    "affected_ttft_p99",
    "affected_tpot_mean",
    "affected_tpot_p99",
    "interrupted_tpot_mean",
    "ttft_mean",
    "ttft_p99",
    "tpot_mean",
    "tpot_p99",
    "e2e_mean",
    "output_tokens_per_s",
    "n_errors",
    "n_interrupted",
    "affected_requests",
    "outage_ttft_vs_baseline",
    "outage_tpot_vs_baseline",
)


@dataclass
class PolicyAggregate:
    policy: str
    repeats: int
    recovered: int  # runs whose affected period ended (or never started)
    seeds: list[int]
    metrics: dict[str, CI]

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "repeats": self.repeats,
            "recovered": self.recovered,
            "seeds": self.seeds,
            "metrics": {k: v.to_dict() for k, v in self.metrics.items()},
        }


def aggregate(summaries: Iterable[RunSummary]) -> list[PolicyAggregate]:
    """Group runs by policy (in first-seen order) and give each metric its mean ± 95% CI."""
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        groups.setdefault(s.policy, []).append(s)
    out = []
    for policy, runs in groups.items():
        metrics = {}
        for name in METRICS:
            vals = [float(getattr(r, name)) for r in runs]
            m, hw = ci95(vals)
            metrics[name] = CI(m, hw, int(np.isfinite(vals).sum()))
        out.append(
            PolicyAggregate(
                policy=policy,
                repeats=len(runs),
                recovered=sum(r.recovered for r in runs),
                seeds=[r.seed for r in runs],
                metrics=metrics,
            )
        )
    return out


# A failure run whose outage TTFT ratio is at most this lost no capacity (DESIGN.md §5).
NO_CAPACITY_LOSS_RATIO = 1.0


def check_capacity(summaries: Sequence[RunSummary], reference_policy: str = "stop-restart") -> dict:
    """Per seed: did the failure cost capacity? Sets ``capacity_lost`` on every failure run.

    The judge is ``reference_policy``'s ``outage_ttft_vs_baseline`` in that seed (stop-restart: it
    has nothing that could hide a loss of capacity): above 1 the failure cost capacity; at or below
    1 the survivors absorbed the dead worker's share (workers sharing one device) and no recovery
    comparison from that seed means anything (DESIGN.md §5). Where the reference policy did not run
    (or its outage is unknown) the other policies' ratios judge instead, any above 1 meaning a loss,
    and the seed's ``basis`` says so; where no run has a ratio the seed is unchecked (None).

    Returns ``{"rule", "reference_policy", "seeds": [{"seed", "capacity_lost", "basis",
    "basis_is_reference", "outage_ttft_vs_baseline": {policy: ratio}}], "no_capacity_loss_seeds",
    "unchecked_seeds", "no_capacity_loss_runs": [{"policy", "seed", "outage_ttft_vs_baseline"}]}``,
    the last listing every failure run of a seed that lost no capacity. Each seed also has
    ``pre_failure_ttft_vs_baseline`` ({policy: ratio} over the requests served before the failure, the same
    requests in both runs: chance alone sets them apart), ``noise`` (the largest |ratio - 1| of them) and
    ``within_noise`` (a loss no larger than that noise); ``within_noise_seeds`` lists those seeds.
    """
    runs = [s for s in summaries if not is_failure_free(s.policy)]
    by_seed: dict[int, list[RunSummary]] = {}
    for s in runs:
        by_seed.setdefault(s.seed, []).append(s)
    seeds, no_loss, unchecked, no_loss_runs = [], [], [], []
    for seed, rs in by_seed.items():
        ratios = {s.policy: s.outage_ttft_vs_baseline for s in rs}
        known = {p: r for p, r in ratios.items() if math.isfinite(r)}
        if reference_policy in known:
            basis = [reference_policy]
            lost: bool | None = known[reference_policy] > NO_CAPACITY_LOSS_RATIO
        elif known:
            basis = list(known)
            lost = max(known.values()) > NO_CAPACITY_LOSS_RATIO
        else:
            basis, lost = [], None
        for s in rs:
            s.capacity_lost = lost
        pre = [s.pre_failure_ttft_vs_baseline for s in rs if math.isfinite(s.pre_failure_ttft_vs_baseline)]
        noise = max((abs(r - 1.0) for r in pre), default=math.nan)
        judge = max(known[p] for p in basis) if basis else math.nan
        seeds.append({"seed": seed, "capacity_lost": lost, "basis": basis,
                      "basis_is_reference": basis == [reference_policy], "outage_ttft_vs_baseline": ratios,
                      "pre_failure_ttft_vs_baseline": {s.policy: s.pre_failure_ttft_vs_baseline for s in rs},
                      "noise": noise,
                      # a loss no larger than the runs' own difference before the failure is not shown
                      "within_noise": bool(lost) and math.isfinite(noise) and judge - 1.0 <= noise})
        if lost is None:
            unchecked.append(seed)
        elif not lost:
            no_loss.append(seed)
            no_loss_runs += [{"policy": s.policy, "seed": seed, "outage_ttft_vs_baseline": s.outage_ttft_vs_baseline}
                             for s in rs]
    return _json_safe({
        "rule": f"a seed's failure cost capacity when {reference_policy}'s outage_ttft_vs_baseline (mean TTFT of "
                "requests arriving while the killed worker was gone, over the same requests' without the "
                f"failure) is > {NO_CAPACITY_LOSS_RATIO:g}; else the survivors absorbed the dead worker's share "
                "and no recovery comparison from that seed means anything (DESIGN.md §5); a seed's noise is the largest "
                "|pre_failure_ttft_vs_baseline - 1| of its failure runs (the same ratio over the requests that "
                "arrived before the failure), and a loss no larger than that is within_noise",
        "reference_policy": reference_policy,
        "seeds": seeds,
        "no_capacity_loss_seeds": no_loss,
        "unchecked_seeds": unchecked,
        "no_capacity_loss_runs": no_loss_runs,
        "within_noise_seeds": [d["seed"] for d in seeds if d["within_noise"]],
    })


def failure_free_overhead(summaries: Sequence[RunSummary]) -> list[dict]:
    """What each policy costs where nothing fails: per policy with runs labelled
    ``failure_free_label(policy)``, its mean TTFT and TPOT over the reference run's (NO_FAILURE) of the
    same seed, mean ± 95% CI over the seeds that have both. [] where no such run exists."""
    reference = {s.seed: s for s in summaries if s.policy == NO_FAILURE}
    groups: dict[str, list[RunSummary]] = {}
    for s in summaries:
        if s.policy != NO_FAILURE and is_failure_free(s.policy) and s.seed in reference:
            groups.setdefault(s.policy[len(NO_FAILURE) + 1:], []).append(s)
    out = []
    for policy, runs in groups.items():
        row: dict = {"policy": policy, "seeds": [r.seed for r in runs]}
        for key in ("ttft_mean", "tpot_mean"):
            ratios = [_ratio(getattr(r, key), getattr(reference[r.seed], key)) for r in runs]
            m, hw = ci95(ratios)
            row[f"{key}_vs_reference"] = CI(m, hw, int(np.isfinite(ratios).sum())).to_dict()
            row[f"{key}_s"] = ci95([getattr(r, key) for r in runs])[0]
        out.append(_json_safe(row))
    return out
