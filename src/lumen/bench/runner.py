"""``run_bench``: the no-failure reference and every policy under a failure plan, same seeds.

For each seed in seed … seed+repeats−1:
  1. build the seeded workload (or the trace),
  2. run it without failures (the reference; policy does not matter without failures, we use
     stop-restart, the plainest),
  3. run it once per policy with the failure plan injected,
  4. summarise each failure run against the reference of the same seed.
Every run gets a fresh cluster (failures must not leak from one run into the next), unless
``url`` is given: then the bench attaches to that cluster, measures whatever policy it runs,
and waits between runs until every worker is serving again.

After the table the bench warns, and results.json lists under ``no_capacity_loss_runs``, the
seeds whose failure cost no capacity (stop-restart's outage TTFT no worse than without the failure:
the survivors absorbed the dead worker's share), from which no recovery comparison means anything.

Outputs under ``out``: results.json (meta, capacity check, aggregates, per-run summaries and fault events),
runs.csv, summary.csv, ttft_timeline.png, policies.png, records/<policy>-seed<k>.jsonl (every
request), logs/<policy>-seed<k>.log (cluster output).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from lumen.metrics import (
    NO_FAILURE,
    PolicyAggregate,
    RequestRecord,
    RunSummary,
    aggregate,
    plot_policy_bars,
    plot_ttft_timeline,
    render_table,
    summarize_run,
    write_aggregate_csv,
    write_json,
    write_runs_csv,
)
from lumen.metrics.report import (
    capacity_warnings,
    paper_verdict,
    print_fitted,
    render_overhead_table,
    render_per_worker_table,
    render_targets_table,
    report_console,
)
from lumen.metrics.summary import check_capacity, failure_free_label, failure_free_overhead, is_failure_free
from lumen.metrics.targets import RecoveryTargets, aggregate_targets, counts_between, recovery_targets
from lumen.workload import RequestSpec, load_trace, make_workload

from .client import ClientConfig, LoadClient, server_model
from .cluster import ClusterProcess, free_port, serve_command, wait_ready
from .faults import FaultEvent, FaultInjectionError, FaultSpec, parse_fail_plan, run_plan

__all__ = ["BenchConfig", "BenchResults", "RunResult", "run_bench", "DEFAULT_POLICIES", "REFERENCE_POLICY"]

DEFAULT_POLICIES = ("stop-restart", "fixed-ckpt", "lumen")
REFERENCE_POLICY = "stop-restart"
FAILURE_FREE = ("reference", "all")  # BenchConfig.failure_free
DEFAULT_REQUESTS = 1000


@dataclass
class BenchConfig:
    model: str = "default"
    workers: int = 4
    devices: str | None = None
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    qps: float | None = 4.0  # None: calibrate (target_load × measured throughput of the first cluster)
    target_load: float = 0.5  # with qps=None: fraction of the measured saturated request rate
    requests: int | None = None  # default: duration × qps, else DEFAULT_REQUESTS
    duration: float | None = None  # seconds of arrivals
    lengths: str = "sharegpt"
    arrival: str = "poisson"
    burstiness: float = 1.0
    trace: str | None = None
    time_scale: float = 1.0
    max_prompt: int | None = None
    max_output: int | None = None
    fail: list[str] = field(default_factory=lambda: ["t=30s:worker=1:SIGKILL"])
    # runs without the failure: "reference" only (stop-restart's, which every failure run is measured
    # against), or "all": each policy's too, for what it costs where nothing fails (checkpoint streaming,
    # placement), as the paper reports beside recovery
    failure_free: str = "reference"
    repeats: int = 5
    seed: int = 0
    url: str | None = None
    out: str | None = None
    window: int | None = 200  # None: auto, requests // 12 (at least 5), so a short run still has ~12 windows
    threshold: float = 0.05
    settle: int = 3
    # Windows whose every request had its first token before the first failure cannot start the
    # affected period (see lumen.metrics.recovery); False = the paper's rule verbatim.
    causal_start: bool = True
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port per cluster
    serve_args: list[str] = field(default_factory=list)
    reload_delay_s: float = 0.0  # every reload this much longer (LUMEN_FAULT_SLOW_RELOAD_S): a bigger model's
    serve_cmd: list[str] | None = None  # replaces "python -m lumen serve ..." ({port},{policy} substituted)
    startup_timeout_s: float = 900.0
    stop_grace_s: float = 10.0
    request_timeout_s: float = 300.0
    max_concurrency: int = 512
    warmup_requests: int | None = None  # default 2 per worker; not recorded
    calibration_requests: int | None = None  # --qps auto probe size; default 2 per worker (at least 4)
    resume: bool = False  # reuse runs already finished in `out` (same config), run only the missing ones
    report_only: bool = False  # with resume: report the finished runs in `out`, start nothing
    token_id_range: tuple[int, int] = (100, 1000)
    quiet: bool = False

    def n_requests(self, qps: float | None = None) -> int:
        qps = qps if qps is not None else self.qps
        if self.requests is not None:
            return self.requests
        if self.duration is not None and qps is not None:
            return max(1, math.ceil(self.duration * qps))
        return DEFAULT_REQUESTS

    def window_for(self, n: int) -> int:
        return self.window if self.window is not None else max(5, n // 12)


@dataclass
class RunResult:
    policy: str  # NO_FAILURE for the reference
    seed: int
    records: list[RequestRecord]
    events: list[FaultEvent]
    summary: RunSummary | None = None
    # Worker restarts the plan does not explain (e.g. a worker declared dead on missed
    # heartbeats). Non-zero means the run measured more failures than it injected.
    unplanned_restarts: int | None = None
    # run clock: when the last worker the plan killed served again (None: unknown, or no kill)
    outage_end_s: float | None = None
    # where its interrupted requests went (None: the cluster did not say, e.g. runs from before the counters)
    targets: RecoveryTargets | None = None
    # the machine the bench ran it on (`host_identity`; None: a run from before it was recorded)
    host: dict | None = None


@dataclass
class BenchResults:
    out_dir: Path
    runs: list[RunResult]
    summaries: list[RunSummary]
    aggregates: list[PolicyAggregate]
    files: dict[str, Path]
    meta: dict
    capacity: dict = field(default_factory=dict)  # lumen.metrics.summary.check_capacity's result


def _workload(cfg: BenchConfig, seed: int, qps: float) -> list[RequestSpec]:
    if cfg.trace:
        specs = load_trace(cfg.trace, cfg.time_scale, cfg.requests)
        if cfg.max_prompt or cfg.max_output:
            specs = [
                RequestSpec(
                    s.req_id,
                    s.arrival,
                    min(s.prompt_tokens, cfg.max_prompt or s.prompt_tokens),
                    min(s.output_tokens, cfg.max_output or s.output_tokens),
                )
                for s in specs
            ]
        return specs
    return make_workload(
        cfg.n_requests(qps),
        qps,
        cfg.lengths,
        seed=seed,
        arrival=cfg.arrival,
        burstiness=cfg.burstiness,
        max_prompt=cfg.max_prompt,
        max_output=cfg.max_output,
    )


def _validate(cfg: BenchConfig) -> list[FaultSpec]:
    if cfg.repeats < 1:
        raise ValueError("repeats must be >= 1")
    if cfg.window is not None and cfg.window < 1:
        raise ValueError("window must be >= 1")
    if cfg.qps is None and cfg.trace:
        raise ValueError("--qps auto needs a synthetic workload; a trace brings its own arrival times")
    if cfg.qps is None and cfg.requests is None and cfg.duration is None:
        raise ValueError("--qps auto needs --duration (or --requests)")
    if cfg.qps is None and not 0 < cfg.target_load <= 1:
        raise ValueError("target_load must be in (0, 1]")
    if not cfg.policies:
        raise ValueError("at least one policy is needed")
    if cfg.failure_free not in FAILURE_FREE:
        raise ValueError(f"failure_free must be one of {', '.join(FAILURE_FREE)}, not {cfg.failure_free!r}")
    if cfg.failure_free == "all" and cfg.url:
        raise ValueError("--failure-free all starts a cluster per policy; --url measures one attached cluster")
    plan = parse_fail_plan(cfg.fail)
    if not plan:
        raise ValueError("the failure plan is empty; pass --fail t=30s:worker=1:SIGKILL (or similar)")
    for f in plan:
        if isinstance(f.worker, int) and f.worker >= cfg.workers and not cfg.url:
            raise ValueError(f"failure {f} names worker {f.worker} but the cluster has {cfg.workers} workers")
    return plan


class _Progress:
    """rich progress bars: one for the whole bench, one for the current run's requests."""

    def __init__(self, total_runs: int, quiet: bool, console) -> None:
        self.bar = None
        if quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.all = self.bar.add_task("bench runs", total=total_runs)
        self.cur = None

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def log(self, msg: str) -> None:
        if self.bar:
            self.bar.console.log(msg)

    def start_run(self, label: str, n: int) -> Callable[[RequestRecord], None]:
        if not self.bar:
            return lambda r: None
        if self.cur is not None:
            self.bar.remove_task(self.cur)
        self.cur = self.bar.add_task(label, total=n)
        return lambda r: self.bar.advance(self.cur)

    def end_run(self) -> None:
        if self.bar:
            self.bar.advance(self.all)


async def _replay_with_faults(
    url: str, specs: list[RequestSpec], plan: Sequence[FaultSpec], cfg: BenchConfig, seed: int, on_done
) -> tuple[list[RequestRecord], list[FaultEvent]]:
    client = LoadClient(
        ClientConfig(
            url=url,
            model=None,  # the served name (e.g. the model directory's name), asked from the server
            max_concurrency=cfg.max_concurrency,
            request_timeout_s=cfg.request_timeout_s,
            token_id_range=cfg.token_id_range,
            seed=seed,
        )
    )
    loop = asyncio.get_running_loop()
    started: asyncio.Future[float] = loop.create_future()
    replay = asyncio.create_task(
        client.replay(specs, on_done=on_done, on_start=lambda t0: started.done() or started.set_result(t0))
    )
    if not plan:
        return await replay, []
    faults: asyncio.Task | None = None
    try:
        await asyncio.wait({started, replay}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            return await replay, []
        faults = asyncio.create_task(run_plan(url, plan, started.result()))
        await asyncio.wait({replay, faults}, return_when=asyncio.FIRST_EXCEPTION)
        if faults.done() and faults.exception() is not None:
            replay.cancel()
            raise faults.exception()
        records = await replay
        if not faults.done():
            # The workload ended before (part of) the plan ran: stop the injector, keep its events.
            faults.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await faults
            events = [FaultEvent(str(f), f.at_s, worker=f.worker if isinstance(f.worker, int) else -1,
                                 signal=f.sig.name) for f in plan]
            for ev in events:
                ev.notes.append("not injected: the workload ended first")
            return records, events
        return records, faults.result()
    finally:
        for t in (replay, faults):
            if t is not None and not t.done():
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


async def _check_fits(url: str, specs: Sequence[RequestSpec]) -> None:
    # A request longer than the model's context gets a 400 from every policy alike: that is a
    # configuration mistake, not a result, so refuse up front.
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        _, max_len = await server_model(http)
    if max_len is None:
        return
    worst = max(specs, key=lambda s: s.prompt_tokens + s.output_tokens)
    if worst.prompt_tokens + worst.output_tokens > max_len:
        raise ValueError(
            f"request {worst.req_id} needs {worst.prompt_tokens} + {worst.output_tokens} tokens but the model's "
            f"context is {max_len}; use --max-prompt/--max-output (e.g. --max-prompt {max_len // 2} "
            f"--max-output {max_len // 4})"
        )


async def _warmup(url: str, cfg: BenchConfig) -> None:
    # A few short requests so that first-call costs (allocations, graph capture, imports) are
    # paid before the measured replay, in the reference and the failure runs alike.
    n = cfg.warmup_requests if cfg.warmup_requests is not None else 2 * cfg.workers
    if n <= 0:
        return
    specs = [RequestSpec(-(i + 1), 0.0, 16, 4) for i in range(n)]
    client = LoadClient(ClientConfig(url=url, request_timeout_s=cfg.request_timeout_s,
                                     token_id_range=cfg.token_id_range, keep_token_times=False))
    await client.replay(specs)


def _save_records(path: Path, records: Sequence[RequestRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            d = r.to_dict()
            d["token_times"] = r.token_times
            f.write(json.dumps(d) + "\n")


def host_identity() -> dict:
    """The machine a run ran on: its name and this boot's id. Device machines are lent one lease at a
    time and boot anew, all named alike, so `--resume` on a later lease shows here as another boot."""
    boot = None
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    return {"node": platform.node(), "boot_id": boot}


def seeds_mixing_hosts(runs: Sequence[RunResult]) -> dict[int, dict[str, str]]:
    """{seed: {run label: machine}} for each seed whose runs (its reference included) did not all run on
    one machine; a run from before machines were recorded is 'unknown'. Such a seed compares its policies
    across machines, not side by side: on two H100 leases of 2026-12-07 the same requests before the kill
    were served with TTFT 1.3-1.5x apart."""
    by_seed: dict[int, dict[str, str]] = {}
    for r in runs:
        host = r.host or {}
        by_seed.setdefault(r.seed, {})[r.policy] = host.get("boot_id") or host.get("node") or "unknown"
    return {seed: hosts for seed, hosts in by_seed.items() if len(set(hosts.values())) > 1}


def _save_run_meta(out: Path, label: str, seed: int, events: Sequence[FaultEvent], unplanned: int | None,
                   cluster_end: dict | None = None, outage_end: float | None = None) -> None:
    # Written last: its presence marks the run as finished for --resume.
    path = out / "records" / f"{label}-seed{seed}.run.json"
    path.write_text(json.dumps({"events": [e.to_dict() for e in events], "unplanned_restarts": unplanned,
                                "cluster_end": cluster_end, "outage_end_s": outage_end, "host": host_identity()}))


def outage_end(events: Sequence[FaultEvent], cluster_end: dict | None) -> float | None:
    """Run clock of the moment the last worker killed by the plan served again: the injection's
    replay time plus the wall-clock gap from the signal to the worker's next SERVING (`serving_at`
    in its phases, reported by the controller). None without a SIGKILL, or where a killed worker's
    return is unknown (it never came back, or the cluster did not say)."""
    workers = {w.get("id"): w.get("phases_s") or {} for w in (cluster_end or {}).get("workers") or []
               if isinstance(w, dict)}
    ends = []
    for ev in events:
        if ev.signal != "SIGKILL" or ev.injected_s is None or ev.injected_wall is None:
            continue
        back = workers.get(ev.worker, {}).get("serving_at")
        if not isinstance(back, (int, float)) or back <= ev.injected_wall:
            return None
        ends.append(ev.injected_s + back - ev.injected_wall)
    return max(ends) if ends else None


def _load_run(out: Path, label: str, seed: int) -> RunResult | None:
    meta_path = out / "records" / f"{label}-seed{seed}.run.json"
    rec_path = out / "records" / f"{label}-seed{seed}.jsonl"
    if not (meta_path.is_file() and rec_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    records = [RequestRecord.from_dict(json.loads(line)) for line in rec_path.read_text().splitlines() if line]
    events = [FaultEvent(**e) for e in meta["events"]]
    return RunResult(label, seed, records, events, unplanned_restarts=meta.get("unplanned_restarts"),
                     outage_end_s=meta.get("outage_end_s"), targets=_targets(meta.get("cluster_end")),
                     host=meta.get("host"))


_STATE_FILE = "bench-state.json"


async def _cluster(url: str) -> dict | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
            r = await http.get("/lumen/cluster")
            if r.status_code == 200 and isinstance(r.json(), dict):
                return r.json()
    return None


def _epochs(cluster: dict | None) -> dict[int, int] | None:
    with contextlib.suppress(KeyError, ValueError, AttributeError, TypeError):
        return {int(w["id"]): int(w["epoch"]) for w in cluster["workers"]}
    return None


# What a run's end state keeps of each worker (the rest of /lumen/cluster is per request): how much
# was checkpointed, refused and restored, so a run's recovery can be explained after the machine is gone
_END_STATS = ("ckpt_", "pages_", "restored_", "exported_pages", "export_deferred", "kv_", "spec_",
              "hb_late_max_ms", "preemptions",
              # the goodput rule's choices on a partner (K histogram, verify positions) and its step model
              "assist_", "step_c",
              # time slots: steps, slots used, overruns, waits, late starts; the step estimates that gate them
              "slot_", "slots_used", "ema_", "num_waiting", "num_running", "steps")


def _recovered_here(cluster: dict | None) -> dict[int, dict] | None:
    if not isinstance(cluster, dict) or not isinstance(cluster.get("workers"), list):
        return None
    return {w["id"]: w["recovered_here"] for w in cluster["workers"]
            if isinstance(w, dict) and isinstance(w.get("id"), int) and isinstance(w.get("recovered_here"), dict)}


def _cluster_end(cluster: dict | None, before: dict | None = None) -> dict | None:
    """What the run keeps of the cluster's state at its end; `recovered_here` counts this run's
    dispatches only (the counters are cumulative: an attached cluster serves several runs)."""
    if not isinstance(cluster, dict) or not isinstance(cluster.get("workers"), list):
        return None
    recovered = counts_between(_recovered_here(before), _recovered_here(cluster) or {})
    workers = [{"id": w.get("id"), "epoch": w.get("epoch"), "phases_s": w.get("phases_s"),
                "stats": {k: v for k, v in (w.get("stats") or {}).items() if k.startswith(_END_STATS)},
                **({"recovered_here": recovered[w["id"]]} if w.get("id") in recovered else {})}
               for w in cluster["workers"] if isinstance(w, dict)]
    return {"workers": workers, **{k: v for k, v in cluster.items()
                                   if k in ("policy", "unprotected_requests", "transport_drops")}}


def _targets(cluster_end: dict | None) -> RecoveryTargets | None:
    counts = _recovered_here(cluster_end)
    return recovery_targets(counts) if counts else None


def _unplanned(before: dict[int, int] | None, after: dict[int, int] | None, events: Sequence[FaultEvent]) -> int | None:
    # Each SIGKILL of the plan explains one restart of its worker; a SIGSTOP may or may not
    # (the hang may be declared a death), so it explains at most one.
    if before is None or after is None:
        return None
    restarts = {w: after.get(w, e) - e for w, e in before.items()}
    for ev in events:
        if ev.injected_s is not None and restarts.get(ev.worker, 0) > 0:
            restarts[ev.worker] -= 1
    return sum(max(0, n) for n in restarts.values())


async def _attached_policy(url: str) -> str:
    with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
        async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
            r = await http.get("/lumen/cluster")
            if r.status_code == 200 and isinstance(r.json().get("policy"), str):
                return r.json()["policy"]
    return "attached"


async def _calibrate(url: str, cfg: BenchConfig, seed: int) -> dict:
    """Measure the saturated request rate of the cluster at ``url`` on the workload's lengths.

    2 × workers requests (at least 4) of the configured length distribution are sent at once;
    rate = requests / makespan, a conservative estimate of capacity (the tail of the burst
    runs below full batch). The bench then uses qps = target_load × rate for every run.
    """
    k = cfg.calibration_requests or max(4, 2 * cfg.workers)
    probe = make_workload(k, 1.0, cfg.lengths, seed=seed + 1_000_003, max_prompt=cfg.max_prompt,
                          max_output=cfg.max_output)
    specs = [RequestSpec(s.req_id, 0.0, s.prompt_tokens, s.output_tokens) for s in probe]
    client = LoadClient(ClientConfig(url=url, request_timeout_s=cfg.request_timeout_s,
                                     token_id_range=cfg.token_id_range, keep_token_times=False))
    t = time.monotonic()
    recs = await client.replay(specs)
    makespan = time.monotonic() - t
    bad = [r.error for r in recs if r.error]
    if bad:
        raise RuntimeError(f"calibration requests failed ({len(bad)}/{k}), e.g. {bad[0]}")
    rate = k / makespan
    return {"probe_requests": k, "makespan_s": makespan, "saturated_rps": rate, "target_load": cfg.target_load,
            "qps": cfg.target_load * rate}


class _Bench:
    """State of one bench: the (possibly calibrated) rate and the per-seed workloads."""

    def __init__(self, cfg: BenchConfig, out: Path, progress: _Progress) -> None:
        self.cfg, self.out, self.progress = cfg, out, progress
        self.qps = cfg.qps
        self.calibration: dict | None = None
        self._specs: dict[int, list[RequestSpec]] = {}

    def _save_state(self) -> None:
        (self.out / _STATE_FILE).write_text(json.dumps({"qps": self.qps, "calibration": self.calibration}))

    def load_state(self) -> None:
        """(Not for a trace: it brings its own arrivals.) --resume keeps the rate calibrated by the first
        invocation, so every run sees one workload. A fixed --qps is recorded too: resuming at another
        rate would mix two workloads in one table."""
        path = self.out / _STATE_FILE
        if (self.cfg.resume or self.cfg.report_only) and path.is_file():
            state = json.loads(path.read_text())
            qps = float(state["qps"])
            if self.cfg.qps is not None and not math.isclose(self.cfg.qps, qps, rel_tol=1e-9):
                raise ValueError(f"{self.out} was run at {qps:g} req/s: resuming it at --qps {self.cfg.qps:g} "
                                 f"would mix two workloads; pass --qps {qps:g} (or auto), or another --out")
            self.qps, self.calibration = qps, state.get("calibration")
            self.progress.log(f"resumed: qps {self.qps:.2f} from {path}")
        elif self.qps is not None and not self.cfg.report_only:
            self._save_state()

    async def specs_for(self, seed: int, url: str) -> list[RequestSpec]:
        if seed in self._specs:
            return self._specs[seed]
        if self.qps is None and not self.cfg.trace:  # (a resumed rate was loaded by run_bench_async)
            self.calibration = await _calibrate(url, self.cfg, seed)
            self.qps = self.calibration["qps"]
            self._save_state()
            self.progress.log(
                f"calibrated: saturated {self.calibration['saturated_rps']:.2f} req/s -> "
                f"qps {self.qps:.2f} ({self.cfg.target_load:.0%} load)"
            )
        specs = _workload(self.cfg, seed, self.qps if self.qps is not None else 1.0)
        plan_end = max((f.at_s for f in parse_fail_plan(self.cfg.fail)), default=0.0)
        n_windows = math.ceil(len(specs) / self.cfg.window_for(len(specs)))
        if n_windows < 2 * self.cfg.settle + 2:
            self.progress.log(
                f"[yellow]warning: {len(specs)} requests make only {n_windows} windows; recovery needs a degraded "
                f"window and {self.cfg.settle} good ones after it - use more requests/--duration or a smaller --window"
            )
        if plan_end > specs[-1].arrival:
            self.progress.log(
                f"[yellow]warning: failure at {plan_end:g}s is after the last arrival ({specs[-1].arrival:.1f}s)"
            )
        self._specs[seed] = specs
        return specs

    async def run_one(self, policy: str, seed: int, plan: Sequence[FaultSpec], label: str | None = None
                      ) -> RunResult | None:
        """`policy` on seed `seed`'s workload under `plan`; the run is stored and reported as `label`
        (default: the policy, or NO_FAILURE without a plan)."""
        cfg, out, progress = self.cfg, self.out, self.progress
        label = label or (NO_FAILURE if not plan else policy)
        if cfg.resume or cfg.report_only:
            done = _load_run(out, label, seed)
            if done is not None or cfg.report_only:
                progress.log(f"{label} seed {seed}: " + (f"reusing the finished run in {out}" if done else "not run"))
                progress.end_run()
                return done
        if cfg.url:
            await wait_ready(cfg.url, cfg.startup_timeout_s)
            await _warmup(cfg.url, cfg)
            specs = await self.specs_for(seed, cfg.url)
            await _check_fits(cfg.url, specs)
            on_done = progress.start_run(f"{label} seed {seed}", len(specs))
            start = await _cluster(cfg.url)
            records, events = await _replay_with_faults(cfg.url, specs, plan, cfg, seed, on_done)
            end = await _cluster(cfg.url)
            unplanned = _unplanned(_epochs(start), _epochs(end), events)
        else:
            port = cfg.port or free_port(cfg.host)
            if cfg.serve_cmd:
                cmd = [a.format(port=port, policy=policy, workers=cfg.workers, model=cfg.model) for a in cfg.serve_cmd]
            else:
                cmd = serve_command(cfg.model, cfg.workers, policy, port, cfg.host, cfg.devices, cfg.serve_args)
            url = f"http://{cfg.host}:{port}"
            log_path = out / "logs" / f"{label}-seed{seed}.log"
            env = dict(os.environ, LUMEN_FAULT_SLOW_RELOAD_S=f"{cfg.reload_delay_s:g}") if cfg.reload_delay_s else None
            cluster = ClusterProcess(cmd, log_path, env=env, grace_s=cfg.stop_grace_s)
            progress.log(f"{label} seed {seed}: starting cluster on port {port} (log: {log_path})")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a") as f:
                f.write(f"$ {shlex.join(cmd)}\n")
            cluster.start()
            try:
                info = await wait_ready(url, cfg.startup_timeout_s, None if cfg.serve_cmd else cfg.workers,
                                        cluster.proc, log_path)
                cluster.note_workers(info)
                await _warmup(url, cfg)
                specs = await self.specs_for(seed, url)
                await _check_fits(url, specs)
                on_done = progress.start_run(f"{label} seed {seed}", len(specs))
                start = await _cluster(url)
                records, events = await _replay_with_faults(url, specs, plan, cfg, seed, on_done)
                end = await _cluster(url)
                unplanned = _unplanned(_epochs(start), _epochs(end), events)
            finally:
                # Stopping blocks for up to the grace period; keep the event loop out of it.
                await asyncio.to_thread(cluster.stop)
        _save_records(out / "records" / f"{label}-seed{seed}.jsonl", records)
        back = outage_end(events, end)
        kept = _cluster_end(end, start)
        _save_run_meta(out, label, seed, events, unplanned, kept, back)
        for ev in events:
            if ev.injected_s is None:
                progress.log(f"[yellow]warning: {ev.spec}: {'; '.join(ev.notes) or ev.error}")
        if unplanned:
            progress.log(f"[red]warning: {label} seed {seed}: {unplanned} worker restart(s) the failure plan does "
                         "not explain (workers declared dead on their own?) - this run measured extra failures")
        progress.end_run()
        return RunResult(label, seed, records, events, unplanned_restarts=unplanned, outage_end_s=back,
                         targets=_targets(kept), host=host_identity())


def _summarise(cfg: BenchConfig, run: RunResult, reference: RunResult) -> RunSummary:
    times = [e.injected_s for e in run.events if e.injected_s is not None]
    return summarize_run(
        run.records,
        reference.records,
        window=cfg.window_for(len(reference.records)),
        threshold=cfg.threshold,
        settle=cfg.settle,
        policy=run.policy,
        seed=run.seed,
        failure_times=times,
        not_before=min(times) if (times and cfg.causal_start) else None,
        outage_end=run.outage_end_s,
        failed_workers=[e.worker for e in run.events if e.injected_s is not None and e.worker >= 0],
    )


async def run_bench_async(cfg: BenchConfig, console=None) -> BenchResults:
    console = console or report_console()
    plan = _validate(cfg)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out or f"runs/bench-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    policies = [await _attached_policy(cfg.url)] if cfg.url else list(cfg.policies)
    seeds = list(range(cfg.seed, cfg.seed + cfg.repeats))
    reference_policy = REFERENCE_POLICY if not cfg.url else policies[0]
    # each policy's own failure-free run (after the seed's failure runs: a block cut short keeps those)
    failure_free = [p for p in policies if p != reference_policy] if cfg.failure_free == "all" else []
    runs: list[RunResult] = []
    summaries: list[RunSummary] = []
    with _Progress(len(seeds) * (1 + len(policies) + len(failure_free)), cfg.quiet, console) as progress:
        bench = _Bench(cfg, out, progress)
        if not cfg.trace:
            bench.load_state()
        for seed in seeds:
            ref = await bench.run_one(reference_policy, seed, [])
            if ref is None:  # --report-only: this seed was not run
                continue
            ref.summary = summarize_run(ref.records, ref.records, window=cfg.window_for(len(ref.records)),
                                        threshold=cfg.threshold, settle=cfg.settle, policy=NO_FAILURE, seed=seed)
            runs.append(ref)
            summaries.append(ref.summary)
            for policy in policies:
                r = await bench.run_one(policy, seed, plan)
                if r is None:
                    continue
                r.summary = _summarise(cfg, r, ref)
                runs.append(r)
                summaries.append(r.summary)
            for policy in failure_free:
                label = failure_free_label(policy)
                r = await bench.run_one(policy, seed, [], label)
                if r is None:
                    continue
                r.summary = summarize_run(r.records, r.records, window=cfg.window_for(len(r.records)),
                                          threshold=cfg.threshold, settle=cfg.settle, policy=label, seed=seed)
                runs.append(r)
                summaries.append(r.summary)
    # Before anything is written: it sets each failure run's capacity_lost (DESIGN.md §5).
    capacity = check_capacity(summaries, REFERENCE_POLICY)
    aggregates = aggregate(summaries)
    overhead = failure_free_overhead(summaries)
    mixed = seeds_mixing_hosts(runs)
    # failure runs whose cluster reported the counters (is_failure_free covers the reference too)
    counted = [r for r in runs if not is_failure_free(r.policy) and r.targets is not None]
    targets = {"runs": [{"policy": r.policy, "seed": r.seed, **r.targets.to_dict()} for r in counted],
               "by_policy": aggregate_targets((r.policy, r.targets) for r in counted)}
    meta = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "quiet"},
        "requests": len(runs[0].records) if runs else 0,
        "qps": bench.qps,
        "calibration": bench.calibration,
        "window": cfg.window_for(len(runs[0].records)) if runs else cfg.window,
        "seeds": seeds,
        "reference_policy": reference_policy,
        "failure_plan": [str(f) for f in plan],
        "fault_events": [{"policy": r.policy, "seed": r.seed, **e.to_dict()} for r in runs for e in r.events],
        "unplanned_restarts": [{"policy": r.policy, "seed": r.seed, "restarts": r.unplanned_restarts} for r in runs],
        "machine": {"node": platform.node(), "platform": platform.platform(), "python": platform.python_version()},
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "recovery_definition": "lumen.metrics.recovery (DESIGN.md §6); causal_start=" + str(cfg.causal_start),
    }
    files = {
        "json": write_json(out / "results.json", summaries, aggregates, meta, extra={
            "no_capacity_loss_runs": capacity["no_capacity_loss_runs"],
            "capacity_check": {k: v for k, v in capacity.items() if k != "no_capacity_loss_runs"},
            "failure_free_overhead": overhead, "recovery_targets": targets,
            "seeds_mixing_hosts": {str(k): v for k, v in mixed.items()}}),
        "runs_csv": write_runs_csv(out / "runs.csv", summaries),
        "summary_csv": write_aggregate_csv(out / "summary.csv", aggregates),
        "timeline_png": plot_ttft_timeline([s for s in summaries if not is_failure_free(s.policy)] or summaries,
                                           out / "ttft_timeline.png"),
        "bars_png": plot_policy_bars([a for a in aggregates if not is_failure_free(a.policy)] or aggregates,
                                     out / "policies.png"),
    }
    # the failure runs and their reference; each policy's failure-free runs get their own table
    print_fitted(console, render_table([a for a in aggregates if a.policy == NO_FAILURE or not is_failure_free(a.policy)]))
    if overhead:
        print_fitted(console, render_overhead_table(overhead, reference_policy))
    if targets["by_policy"]:
        print_fitted(console, render_targets_table(targets["by_policy"]))
    per_worker = render_per_worker_table([s for s in summaries if not is_failure_free(s.policy)])
    if per_worker is not None:
        print_fitted(console, per_worker)
    for line in capacity_warnings(capacity):
        console.print(line)
    for seed, hosts in mixed.items():
        console.print(f"[yellow]warning: seed {seed} ran on more than one machine ("
                      + ", ".join(f"{label}: {h[:8]}" for label, h in hosts.items())
                      + "): its policies compare across machines, not side by side")
    for line in paper_verdict(aggregates, capacity):
        console.print(line, markup=False)
    console.print(f"results in {out}/: " + ", ".join(p.name for p in files.values()))
    return BenchResults(out, runs, summaries, aggregates, files, meta, capacity)


def run_bench(cfg: BenchConfig, console=None) -> BenchResults:
    """Synchronous entry point (see module doc). Raises FaultInjectionError if a planned
    failure could not be injected, ClusterStartError if a cluster did not come up.

    SIGTERM is handled like Ctrl-C: the run is cancelled, every ``finally`` stops its cluster, and
    KeyboardInterrupt is raised, so ``timeout``/``kill`` of the bench leaves no cluster behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(run_bench_async(cfg, console))
    # The handler cancels the run itself rather than re-raising SIGINT: a bench started as a
    # background job inherits SIGINT ignored, and a parent may hand down SIGTERM blocked (both seen
    # in a full pytest run, where the bench then ignored SIGTERM).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    terminated = False

    async def main() -> BenchResults:
        nonlocal terminated
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_term() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        try:
            return await run_bench_async(cfg, console)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt("SIGTERM") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


__all__ += ["run_bench_async", "FaultInjectionError"]
