"""Repeat runs of every policy on the same seeded workloads, summarised with lumen.metrics
exactly as `lumen bench` summarises live runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from lumen.metrics import NO_FAILURE, PolicyAggregate, RunSummary, aggregate, summarize_run
from lumen.metrics.targets import recovery_targets
from lumen.workload import RequestSpec, make_workload

from .config import FailurePlan, SimConfig
from .core import SimResult, simulate


@dataclass(frozen=True)
class WorkloadSpec:
    requests: int = 15000
    qps: float = 14.0
    lengths: str = "splitwise-conv"
    arrival: str = "poisson"
    burstiness: float = 1.0
    max_prompt: int | None = None
    max_output: int | None = None
    trace: str | None = None     # a trace file replaces the synthetic workload

    def build(self, seed: int) -> list[RequestSpec]:
        if self.trace:
            from lumen.workload import load_trace
            return load_trace(self.trace)
        return make_workload(self.requests, self.qps, self.lengths, seed=seed, arrival=self.arrival,
                             burstiness=self.burstiness, max_prompt=self.max_prompt,
                             max_output=self.max_output)


@dataclass
class Experiment:
    summaries: list[RunSummary] = field(default_factory=list)
    aggregates: list[PolicyAggregate] = field(default_factory=list)
    sim_stats: list[dict] = field(default_factory=list)   # per run: policy, seed, SimStats

    def aggregate_of(self, policy: str) -> PolicyAggregate | None:
        return next((a for a in self.aggregates if a.policy == policy), None)

    def change(self, policy: str, metric: str, vs: str = "stop-restart") -> float:
        """(policy - vs) / vs of the means over repeats, in the paper's convention: the paper's
        "TTFT -44%" is -0.44 here (negative = better than `vs` for times)."""
        a, b = self.aggregate_of(policy), self.aggregate_of(vs)
        if a is None or b is None:
            return math.nan
        x, y = a.metrics[metric].mean, b.metrics[metric].mean
        return (x - y) / y if y and math.isfinite(x) and math.isfinite(y) else math.nan


def run_experiment(cfg: SimConfig, workload: WorkloadSpec, policies: Sequence[str],
                   failures: FailurePlan, repeats: int = 1, seed: int = 0,
                   include_no_failure: bool = True,
                   progress: Callable[[str], None] | None = None) -> Experiment:
    """For each repeat r (seed + r): build the workload, run the no-failure reference once,
    then every policy with the same failures; summarise each against the reference."""
    exp = Experiment()
    for rep in range(repeats):
        s = seed + rep
        wl = workload.build(s)
        base = simulate(cfg, wl, "stop-restart", None, s)
        _log(exp, base, NO_FAILURE, s)
        if include_no_failure:
            exp.summaries.append(summarize_run(base.records, base.records, policy=NO_FAILURE, seed=s))
        for pol in policies:
            res = simulate(cfg, wl, pol, failures, s)
            _log(exp, res, pol, s)
            exp.summaries.append(summarize_run(res.records, base.records, policy=pol, seed=s,
                                               failure_times=res.failure_times))
            if progress:
                progress(f"seed {s} {pol}: {res.stats.events} events in {res.stats.wall_s:.2f}s")
    exp.aggregates = aggregate(exp.summaries)
    return exp


def _log(exp: Experiment, res: SimResult, policy: str, seed: int) -> None:
    exp.sim_stats.append({"policy": policy, "seed": seed, "end_time_s": res.end_time,
                          **asdict(res.stats), "targets": recovery_targets(res.stats.recovered_here).to_dict()})
