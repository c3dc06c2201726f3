"""``lumen chaos``: a seeded random fault schedule against a live cluster under steady load.

One cluster (or ``--url``), one open-loop workload over the OpenAI API, and meanwhile a fault
every ``--fault-every`` seconds on average (exponential gaps, seeded). Each fault picks a kind and
a target from the cluster's own view (``GET /lumen/cluster``) at that moment:

  kill-executor    SIGKILL the serving worker with the most running requests
  kill-holder      SIGKILL a worker that holds checkpoints of live requests (pages may be streaming)
  kill-executor-and-holder  SIGKILL a request's executor and its first holder together (restored
                   from a later copy under --ckpt-replicas >= 2, else recomputed)
  kill-restoring   SIGKILL the executor, then 0.1-0.5 s later the holder restoring its requests
  kill-recovering  SIGKILL a worker that is reloading / loading its draft / assisting / switching
  kill-partner     SIGKILL a serving worker that a recovering worker assists
  kill-many        SIGKILL two workers at once (only with three or more alive)
  hang             SIGSTOP a worker for 1-2.5x the detection deadline, then SIGCONT it

Kinds come round in a seeded shuffled order; one with no target at that moment waits for the next
fault (see FaultPlanner). Every fault leaves ``--min-serving`` serving workers (default half of
them, at least one) neither killed nor stopped. Client abuse runs alongside (``--abuse``): clients that
disconnect mid-stream, a consumer that never reads, and idle connections held open.

Afterwards every worker must be serving again, with no request, checkpoint reservation, stored
page or KV page left behind; the same requests are replayed failure-free (one at a time in
arrival order, on the recovered cluster) and, in deterministic mode (float64, greedy), every
completed output must equal its replay token for token. The report counts requests sent,
completed, failed with an error (and why) and lost (no error, no complete output: must be 0),
faults by kind, recoveries, p99 detection and recovery time, and RSS / open FDs / threads of
every process at the start and the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import re
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from lumen.metrics import RequestRecord, percentile
from lumen.workload import RequestSpec, make_workload

from ..client import ClientConfig, LoadClient
from ..cluster import ClusterProcess, free_port, serve_command, wait_ready
from ..faults import LOCAL_HOSTS
from . import abuse as abusers
from .observe import Monitor, ProcessTracker, snapshot, wait_all_serving, wait_drained
from .planner import FAULT_KINDS, FaultPlanner

__all__ = ["ChaosConfig", "ChaosReport", "Fault", "run_chaos", "run_chaos_async"]


@dataclass
class ChaosConfig:
    model: str = "default"
    workers: int = 4
    policy: str = "lumen"
    devices: str | None = None
    deterministic: bool = True  # float64 greedy: outputs must equal the failure-free replay
    duration: float = 120.0  # seconds of arrivals; faults are injected during this time
    qps: float = 2.0
    lengths: str = "sharegpt"
    max_prompt: int = 128
    max_output: int = 64
    fault_every: float = 8.0  # mean seconds between faults
    replay_sample: int | None = None  # failure-free replay of this many requests (seeded); None: all
    min_serving: int | None = None  # serving workers every fault leaves untouched; None: half of them
    kinds: tuple[str, ...] = FAULT_KINDS
    hb_deadline_s: float | None = None  # detection deadline for hang lengths; None: ask the cluster
    abuse: bool = True
    idle_connections: int = 32
    seed: int = 0
    url: str | None = None
    serve_args: list[str] = field(default_factory=list)
    out: str | None = None
    startup_timeout_s: float = 900.0
    recover_timeout_s: float = 300.0
    request_timeout_s: float = 600.0
    quiet: bool = False


@dataclass
class Fault:
    kind: str
    at_s: float
    targets: list[int]
    pids: list[int]
    states: list[str]
    epochs: list[int]
    signal: str = "SIGKILL"
    resumed_s: float | None = None
    note: str = ""
    detect_s: list[float | None] = field(default_factory=list)
    recover_s: list[float | None] = field(default_factory=list)


@dataclass
class ChaosReport:
    out_dir: Path
    passed: bool
    problems: list[str]
    summary: dict
    files: dict[str, Path]


def _workload(cfg: ChaosConfig) -> list[RequestSpec]:
    n = max(1, math.ceil(cfg.duration * cfg.qps))
    specs = make_workload(n=n, qps=cfg.qps, lengths=cfg.lengths, seed=cfg.seed)
    return [RequestSpec(s.req_id, s.arrival, min(s.prompt_tokens, cfg.max_prompt), min(s.output_tokens, cfg.max_output))
            for s in specs]


_CLIENT_SIDE = re.compile(r"stream: (malformed data|unexpected event|ended without|\w+(Error|Exception)\b)")


def classify_outcome(rec: RequestRecord, spec: RequestSpec) -> str:
    """completed (every token asked for), failed (the server said why: an HTTP error status or an
    error event in the stream) or lost (anything else: a broken or stalled stream, a short output)."""
    err = rec.error or ""
    if not err:
        return "completed" if rec.output_tokens == spec.output_tokens else "lost"
    if err.startswith("http:") or (err.startswith("stream: ") and not _CLIENT_SIDE.match(err)):
        return "failed"
    return "lost"


async def _inject(planner: FaultPlanner, monitor: Monitor, kind: str, victims: list[int], cfg: ChaosConfig,
                  hb_deadline: float, rng: random.Random, tasks: list) -> Fault:
    ws = {w["id"]: w for w in monitor.last["workers"]}
    fault = Fault(kind, monitor.now(), list(victims), [ws[v]["pid"] for v in victims],
                  [ws[v]["state"] for v in victims], [ws[v]["epoch"] for v in victims])
    for w in victims:
        if str(ws[w].get("host")) not in LOCAL_HOSTS:
            raise RuntimeError(f"worker {w} runs on {ws[w].get('host')}: lumen chaos signals local workers only")
    if kind == "hang":
        fault.signal = "SIGSTOP"
        pid, wid = fault.pids[0], victims[0]
        planner.stopped.add(wid)
        os.kill(pid, signal.SIGSTOP)
        hold = rng.uniform(1.0, 2.5) * hb_deadline

        async def resume() -> None:
            try:
                await asyncio.sleep(hold)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                fault.resumed_s = monitor.now()
                planner.stopped.discard(wid)

        tasks.append(asyncio.create_task(resume()))
        return fault
    for pid in fault.pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if kind == "kill-restoring":
        # The executor's requests are restored from their holders right after detection: kill one
        # of those holders while it restores (or, before detection, while it still holds them).
        holders = [r["holder"] for r in monitor.last.get("requests", []) if r.get("executor") == victims[0]
                   and r.get("holder") is not None and r["holder"] not in planner.stopped]
        await asyncio.sleep(rng.uniform(0.1, 0.5))
        c = await monitor.poll()
        serving = {w["id"]: w for w in c["workers"] if w["state"] == "serving" and w["alive"]}
        second = next((h for h in holders if h in serving), None)
        if second is not None and planner.spare_ok(c, victims + [second]):
            fault.targets.append(second)
            fault.pids.append(serving[second]["pid"])
            fault.states.append("serving (restoring)")
            fault.epochs.append(serving[second]["epoch"])
            with contextlib.suppress(ProcessLookupError):
                os.kill(serving[second]["pid"], signal.SIGKILL)
        else:
            fault.note = "no live holder to kill during the restore"
    return fault


async def _chaos(url: str, cfg: ChaosConfig, server_pid: int | None, console) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    rng = random.Random(cfg.seed)
    specs = _workload(cfg)
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        n_workers = cfg.workers if cfg.url is None else len((await http.get("/lumen/cluster")).json()["workers"])
        if n_workers < 2:
            raise ValueError("lumen chaos needs at least 2 workers (one is always left alive)")
        cluster = await wait_all_serving(http, n_workers, cfg.startup_timeout_s)
        model = cluster.get("model") or "default"
        hb_deadline = cfg.hb_deadline_s or float(cluster.get("hb_deadline_s") or 2.0)
        # warm-up (not recorded), then the resource baseline
        warm = LoadClient(ClientConfig(url=url, model=model, keep_token_times=False))
        warmed = await warm.replay([RequestSpec(-(i + 1), 0.0, 16, 4) for i in range(2 * n_workers)])
        failed = [r.error for r in warmed if r.error]
        if failed:  # a workload the cluster refuses would only measure its refusals
            raise ValueError(f"{len(failed)} of {len(warmed)} warm-up requests failed, e.g. {failed[0]}")
        start_stats = snapshot(server_pid, cluster)
        tracker = ProcessTracker(server_pid)

        client = LoadClient(ClientConfig(url=url, model=model, request_timeout_s=cfg.request_timeout_s,
                                         keep_token_ids=True, seed=cfg.seed))
        t0_box: dict = {}
        monitor = Monitor(http, lambda: time.monotonic() - t0_box.get("t0", time.monotonic()))
        planner = FaultPlanner(tuple(cfg.kinds), cfg.seed,
                               cfg.min_serving if cfg.min_serving is not None else n_workers // 2)
        faults: list[Fault] = []
        side: list[asyncio.Task] = []
        abuse = Counter()
        stop_abuse = asyncio.Event()
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("faults: {task.fields[faults]}"), TimeElapsedColumn(),
                            console=console, disable=cfg.quiet, transient=True)
        with progress:
            bar = progress.add_task("chaos", total=len(specs), faults=0)

            async def schedule() -> None:
                while True:
                    await asyncio.sleep(rng.expovariate(1.0 / cfg.fault_every))
                    if monitor.now() > cfg.duration:
                        return
                    c = await monitor.poll()
                    choice = planner.choose(c)
                    if choice is None:
                        continue
                    faults.append(await _inject(planner, monitor, *choice, cfg, hb_deadline, rng, side))
                    progress.update(bar, faults=len(faults))

            def started(t0: float) -> None:
                t0_box["t0"] = t0
                side.append(asyncio.create_task(monitor.run()))
                side.append(asyncio.create_task(tracker.run(monitor)))
                side.append(asyncio.create_task(schedule()))
                if cfg.abuse:
                    side.append(asyncio.create_task(abusers.disconnectors(url, model, stop_abuse, abuse, random.Random(cfg.seed + 1))))
                    side.append(asyncio.create_task(abusers.never_reader(url, model, stop_abuse, abuse)))
                    side.append(asyncio.create_task(abusers.idle_connections(url, cfg.idle_connections, stop_abuse, abuse)))

            try:
                records = await client.replay(specs, on_done=lambda r: progress.advance(bar), on_start=started)
            finally:
                stop_abuse.set()
                for t in side[:3]:
                    t.cancel()
                await asyncio.gather(*side, return_exceptions=True)  # SIGCONTs run even when cancelled

        # Every fault's detection and recovery, from the monitor's timeline, once all have recovered.
        problems: list[str] = []
        try:
            end_cluster = await wait_all_serving(http, n_workers, cfg.recover_timeout_s)
        except TimeoutError as e:
            problems.append(str(e))
            end_cluster = (await http.get("/lumen/cluster")).json()
        await monitor.poll()
        for i, f in enumerate(faults):
            for wid, ep in zip(f.targets, f.epochs, strict=True):
                again = min((g.at_s for g in faults[i + 1:] if wid in g.targets), default=math.inf)
                d, r = monitor.detection_and_recovery(wid, f.at_s, ep, until=again)
                f.detect_s.append(d)
                f.recover_s.append(r)
        end_cluster, leftovers = await wait_drained(http, 30.0)
        problems += [f"left behind: {x}" for x in leftovers]
        end_stats = snapshot(server_pid, end_cluster)
        tracker.sample(end_cluster, monitor.now())

        # The failure-free replay: same prompts, one request at a time, on the recovered cluster.
        replay_client = LoadClient(ClientConfig(url=url, model=model, keep_token_ids=True, keep_token_times=False,
                                                request_timeout_s=cfg.request_timeout_s, seed=cfg.seed, max_concurrency=4))
        chosen = specs
        if cfg.replay_sample is not None and cfg.replay_sample < len(specs):  # long soaks: a seeded sample
            chosen = sorted(random.Random(cfg.seed).sample(specs, cfg.replay_sample), key=lambda s: s.req_id)
        sequential = [RequestSpec(s.req_id, 0.0, s.prompt_tokens, s.output_tokens) for s in chosen]
        with Progress(TextColumn("failure-free replay"), BarColumn(), MofNCompleteColumn(), console=console,
                      disable=cfg.quiet, transient=True) as p2:
            b2 = p2.add_task("replay", total=len(sequential))
            replayed = await replay_client.replay(sequential, on_done=lambda r: p2.advance(b2))
    return dict(specs=specs, records=records, ids=client.token_ids, replayed=replayed, replay_ids=replay_client.token_ids,
                faults=faults, abuse=abuse, start_stats=start_stats, end_stats=end_stats, longest=tracker.longest_lived(), problems=problems,
                restarts={w["id"]: w["epoch"] for w in end_cluster["workers"]},
                start_epochs={w["id"]: w["epoch"] for w in cluster["workers"]}, hb_deadline=hb_deadline)


def _summarise(cfg: ChaosConfig, raw: dict) -> tuple[dict, list[str]]:
    specs = {s.req_id: s for s in raw["specs"]}
    outcome = {r.req_id: classify_outcome(r, specs[r.req_id]) for r in raw["records"]}
    counts = Counter(outcome.values())
    reasons = Counter(r.error.split(":", 1)[0] + ": " + r.error.split(":", 1)[1].strip()[:80]
                      for r in raw["records"] if outcome[r.req_id] != "completed" and r.error)
    differ = []
    replayed_ids = {r.req_id for r in raw["replayed"]}
    compared = 0
    for rid, kind in outcome.items():
        if kind != "completed" or rid not in replayed_ids:
            continue
        compared += 1
        a, b = raw["ids"].get(rid), raw["replay_ids"].get(rid)
        if a != b:
            differ.append(rid)
    replay_failed = [r.req_id for r in raw["replayed"] if r.error is not None]
    faults: list[Fault] = raw["faults"]
    detect = [d for f in faults for d in f.detect_s if d is not None]
    recover = [r for f in faults for r in f.recover_s if r is not None]
    undetected = [f"{f.kind}@{f.at_s:.1f}s w{w}" for f in faults for w, d in zip(f.targets, f.detect_s, strict=True)
                  if d is None and f.signal == "SIGKILL"]
    recoveries = sum(raw["restarts"][w] - raw["start_epochs"].get(w, raw["restarts"][w]) for w in raw["restarts"])
    problems = list(raw["problems"])
    if counts["lost"]:
        problems.append(f"{counts['lost']} requests lost")
    if cfg.deterministic and differ:
        problems.append(f"{len(differ)} outputs differ from the failure-free replay: {differ[:10]}")
    if replay_failed:
        problems.append(f"{len(replay_failed)} requests failed in the failure-free replay: {replay_failed[:10]}")
    if undetected:
        problems.append(f"killed workers never seen failing: {undetected}")
    summary = {
        "requests": {"sent": len(specs), "completed": counts["completed"], "failed": counts["failed"],
                     "lost": counts["lost"], "error_reasons": dict(reasons.most_common())},
        "outputs": {"compared": compared, "differ": len(differ), "differing_ids": differ[:50],
                    "checked": cfg.deterministic},
        "faults": {"injected": len(faults), "by_kind": dict(Counter(f.kind for f in faults)),
                   "workers_hit": sum(len(f.targets) for f in faults)},
        "recoveries": recoveries,
        # restarts no injected fault explains (e.g. a worker declared dead on missed heartbeats under load)
        "unplanned_restarts": max(0, recoveries - len(detect)),
        "detection_s": {"n": len(detect), "p50": _q(detect, 50), "p99": _q(detect, 99), "max": max(detect, default=None)},
        "recovery_s": {"n": len(recover), "p50": _q(recover, 50), "p99": _q(recover, 99), "max": max(recover, default=None)},
        "abuse": dict(raw["abuse"]),
        "processes": {"start": raw["start_stats"], "end": raw["end_stats"], "longest_lived": raw["longest"]},
        "hb_deadline_s": raw["hb_deadline"],
    }
    return summary, problems


def _q(xs: list[float], q: float) -> float | None:
    return round(float(percentile(xs, q)), 3) if xs else None


def _render(console, summary: dict, problems: list[str]) -> None:
    from rich.table import Table

    from lumen.metrics.report import print_fitted

    r, o, f = summary["requests"], summary["outputs"], summary["faults"]
    t = Table(title="lumen chaos", show_header=False)
    t.add_row("requests", f"sent {r['sent']}, completed {r['completed']}, failed {r['failed']}, lost {r['lost']}")
    for why, n in r["error_reasons"].items():
        t.add_row("  error", f"{n} × {why}")
    t.add_row("outputs vs failure-free", f"{o['differ']} of {o['compared']} differ" if o["checked"] else "not checked")
    t.add_row("faults", f"{f['injected']} ({', '.join(f'{k} {n}' for k, n in sorted(f['by_kind'].items()))})")
    t.add_row("recoveries", f"{summary['recoveries']} ({summary['unplanned_restarts']} not caused by an injected fault)")
    d, rc = summary["detection_s"], summary["recovery_s"]
    t.add_row("detection p50 / p99", f"{d['p50']} / {d['p99']} s (n={d['n']})")
    t.add_row("recovery p50 / p99", f"{rc['p50']} / {rc['p99']} s (n={rc['n']})")
    t.add_row("client abuse", ", ".join(f"{k} {v}" for k, v in summary["abuse"].items()) or "off")
    start, end = summary["processes"]["start"], summary["processes"]["end"]
    for name in sorted(set(start) | set(end)):
        a, b = start.get(name) or {}, end.get(name) or {}
        t.add_row(name, f"RSS {a.get('rss_mib')} → {b.get('rss_mib')} MiB, FDs {a.get('fds')} → {b.get('fds')}, "
                        f"threads {a.get('threads')} → {b.get('threads')}" + ("" if a.get("pid") == b.get("pid") else " (restarted)"))
    for rec in summary["processes"].get("longest_lived", []):
        a, b = rec["first"], rec["last"]
        t.add_row(f"{rec['name']} longest-lived", f"pid {rec['pid']}, {rec['lived_s']:g} s: RSS {a['rss_mib']} → "
                  f"{b['rss_mib']} MiB, FDs {a['fds']} → {b['fds']}, threads {a['threads']} → {b['threads']}")
    print_fitted(console, t)  # whole rows in a log, not wrapped at 80 columns
    console.print("[green]PASS: nothing lost, nothing left behind" if not problems else
                  "[red]FAIL:\n  " + "\n  ".join(problems))


def _plot(path: Path, raw: dict, duration: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t for r in raw["records"] for t in (r.token_times or [])]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    if times:
        end = max(max(times), duration)
        counts, edges = np.histogram(times, bins=np.arange(0.0, end + 1.0, 1.0))
        ax.plot(edges[:-1], counts, lw=1.2, label="tokens/s streamed to clients")
    colors = dict(zip(FAULT_KINDS, plt.get_cmap("tab10").colors, strict=False))
    seen = set()
    for f in raw["faults"]:
        ax.axvline(f.at_s, color=colors[f.kind], ls="--", lw=1, label=None if f.kind in seen else f.kind)
        seen.add(f.kind)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("tokens / s")
    ax.set_title("lumen chaos: throughput under injected faults")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run_chaos_async(cfg: ChaosConfig, console=None) -> ChaosReport:
    from lumen.metrics.report import report_console

    console = console or report_console()
    if cfg.workers < 2 and cfg.url is None:
        raise ValueError("lumen chaos needs at least 2 workers (one is always left alive)")
    if cfg.duration <= 0 or cfg.qps <= 0 or cfg.fault_every <= 0:
        raise ValueError("--duration, --qps and --fault-every must be > 0")
    FaultPlanner(tuple(cfg.kinds), 0)  # validates the kinds before anything starts
    out = Path(cfg.out or f"runs/chaos-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    proc = None
    if cfg.url is None:
        port = free_port()
        extra = list(cfg.serve_args) + (["--deterministic"] if cfg.deterministic else [])
        proc = ClusterProcess(serve_command(cfg.model, cfg.workers, cfg.policy, port, devices=cfg.devices, extra=extra),
                              out / "cluster.log")
        url = f"http://127.0.0.1:{port}"
    else:
        url = cfg.url.rstrip("/")
    t_start = time.time()
    try:
        if proc is not None:
            proc.start()
            console.print(f"starting {cfg.workers} workers ({cfg.model}, {cfg.policy}); log: {proc.log_path}")
            proc.note_workers(await wait_ready(url, cfg.startup_timeout_s, cfg.workers, proc.proc, proc.log_path))
        raw = await _chaos(url, cfg, proc.proc.pid if proc else None, console)
        if proc is not None:
            proc.note_workers({"workers": [{"pid": (s or {}).get("pid")} for s in raw["end_stats"].values()]})
    finally:
        if proc is not None:
            proc.stop()
    summary, problems = _summarise(cfg, raw)
    summary["meta"] = {"command": "lumen chaos", "config": {k: v for k, v in asdict(cfg).items()},
                       "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
                       "date_utc": _dt.datetime.fromtimestamp(t_start, _dt.UTC).strftime("%Y-%m-%d %H:%M"),
                       "wall_s": round(time.time() - t_start, 1)}
    summary["fault_log"] = [asdict(f) for f in raw["faults"]]
    summary["passed"], summary["problems"] = not problems, problems
    files = {"json": out / "chaos.json", "png": out / "chaos.png"}
    files["json"].write_text(json.dumps(summary, indent=2, default=str))
    _plot(files["png"], raw, cfg.duration)
    _render(console, summary, problems)
    console.print(f"report: {files['json']}, plot: {files['png']}")
    return ChaosReport(out, not problems, problems, summary, files)


def run_chaos(cfg: ChaosConfig, console=None) -> ChaosReport:
    return asyncio.run(run_chaos_async(cfg, console))
