"""Fidelity of `lumen simulate` against the live cluster (issue 7 item 7), in one command.

    python benchmarks/sim_fidelity.py --out runs/fidelity

1. `lumen profile` of the default model on this machine -> OUT/profile.csv (skipped with --profile CSV);
2. `lumen bench` of the same configuration on a live local cluster (policy stop-restart: for each
   seed a failure-free reference run and a run with one SIGKILL) -> OUT/live/;
3. the simulator (`lumen.sim`, fitted cost model from the profile) on the same seeded workloads
   (`lumen.workload`, the same seeds) and the same failure time, summarised with `lumen.metrics`
   with the bench's window / threshold / settle rule;
4. a table (mean TTFT, mean TPOT, recovery time; live vs sim and the gap in %) and OUT/fidelity.json.

With --profile-from live there is no separate `lumen profile`: the live bench runs with
LUMEN_STEP_LOG set (each worker appends one profile row per engine step), and the steps of the
failure-free reference runs are merged into OUT/profile_live.csv, the simulator's profile -- the
live engine's step costs, contention included, fitted for the mean step per shape (--fit, see
fit_mean). The failure variant is then out of sample; the script also prints how much faster or
slower the live failure runs were than their reference runs before the failure (drift_before_failure).

With --device-share slots (issue 23) the live workers take turns on the CPU in fixed slots (`lumen bench
--device-share slots --slot-ms`) and the simulator models the same: all workers on one device
(workers_per_device = workers), the live cluster's slot length (its /lumen/cluster `slot_ms`). In its slot
a worker has the whole CPU, so the profile is a step with the whole CPU: `lumen profile --threads <cores>`
(no --procs: one worker steps at a time), or better --profile-from live, whose rows are in-slot steps (a
step starts only in its slot; the wait for the slot is not in its time, the simulator adds it).

`uptime` is recorded before and after the profile and the live bench (the machine may be shared).
While the bench runs, the cluster's /lumen/cluster is polled (worker engine counters, reload phases)
and saved to OUT/live/cluster_polls.jsonl; with --worker-profile each worker runs under cProfile
(LUMEN_WORKER_PROFILE) and the report splits the live workers' time into the engine's forward pass,
the rest of the engine step and the worker loop outside it, next to the profile's prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import pstats
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

# the live CPU worker's KV pool as it reports it (num_blocks 513 x block_size 16); not binding here
DEFAULT_KV_TOKENS = 513 * 16


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Poller:
    """Polls /lumen/cluster while the bench runs; a new segment starts whenever the cluster was
    unreachable in between (the bench starts a fresh cluster per run)."""

    def __init__(self, port: int, path: Path, interval: float = 0.5, prof_dir: Path | None = None):
        self.url = f"http://127.0.0.1:{port}/lumen/cluster"
        self.path, self.interval, self.prof_dir = path, interval, prof_dir
        self.stop = threading.Event()
        self.segment = -1
        self.loads: list[float] = []
        self._up = False
        self._prof_n = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.path.open("w") as f:
            while not self.stop.is_set():
                self.loads.append(os.getloadavg()[0])
                try:
                    with urllib.request.urlopen(self.url, timeout=2) as r:
                        doc = json.loads(r.read())
                    if not self._up:
                        self.segment += 1
                        self._up = True
                    f.write(json.dumps({"t": time.time(), "segment": self.segment, "slot_ms": doc.get("slot_ms"),
                                        "workers": [
                        {**{k: w.get(k) for k in ("id", "epoch", "state", "pid", "stats", "phases_s")},
                         "schedstat": _schedstat(w.get("pid"))}
                        for w in doc.get("workers", [])]}) + "\n")
                    f.flush()
                except (OSError, ValueError):
                    self._up = False
                self._collect_profiles()
                self.stop.wait(self.interval)
        self._collect_profiles(final=True)

    def _collect_profiles(self, final: bool = False) -> None:
        # workers dump worker<id>.<epoch>.prof when they stop; the next run's workers would overwrite
        # them, so move each one away once it has been written completely
        if self.prof_dir is None or not self.prof_dir.is_dir():
            return
        for p in sorted(self.prof_dir.glob("*.prof")):
            if final or time.time() - p.stat().st_mtime > 1.0:
                self._prof_n += 1
                p.rename(self.prof_dir / "done" / f"{self._prof_n:03d}-{p.name}")

    def __enter__(self):
        if self.prof_dir is not None:
            (self.prof_dir / "done").mkdir(parents=True, exist_ok=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


def _schedstat(pid) -> list[int] | None:
    """/proc/PID/schedstat of a worker: [ns on a CPU, ns runnable but waiting for a CPU, slices]."""
    try:
        with open(f"/proc/{int(pid)}/schedstat") as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError, TypeError):
        return None


def poll_records(polls_path: Path) -> Iterator[tuple[dict, dict]]:
    """(poll, worker record) for every worker of every /lumen/cluster poll saved by Poller, in file
    order; a poll has "t" and "segment", a worker record "id", "epoch", "state", "stats", "phases_s",
    "schedstat". The readers below take these, so the file is read (and parsed) once."""
    with polls_path.open() as f:
        for line in f:
            d = json.loads(line)
            for w in d["workers"]:
                yield d, w


def cpu_share(records: Iterable[tuple[dict, dict]]) -> dict:
    """Over all worker incarnations: time on a CPU vs time runnable but waiting for one (the run
    queue) -- how much of a live worker's wall time the box's other work took from it."""
    last: dict[tuple, list[int]] = {}
    first: dict[tuple, list[int]] = {}
    for d, w in records:
        st = w.get("schedstat")
        if st and w.get("state") == "serving":
            key = (d["segment"], w["id"], w["epoch"])
            first.setdefault(key, st)
            last[key] = st
    run = sum(last[k][0] - first[k][0] for k in last) / 1e9
    wait = sum(last[k][1] - first[k][1] for k in last) / 1e9
    return {"on_cpu_s": run, "runqueue_wait_s": wait,
            "share_of_runnable_time_on_cpu": run / (run + wait) if run + wait > 0 else math.nan}


def engine_counters(records: Iterable[tuple[dict, dict]]) -> list[dict]:
    """Per (segment, worker, epoch): the last engine counters seen (steps, prefill/decode tokens)."""
    last: dict[tuple, dict] = {}
    for d, w in records:
        st = w.get("stats") or {}
        if "steps" in st:
            last[(d["segment"], w["id"], w["epoch"])] = {
                "segment": d["segment"], "worker": w["id"], "epoch": w["epoch"],
                **{k: st.get(k) for k in ("steps", "prefill_tokens", "decode_tokens", "finished")},
                "phases_s": w.get("phases_s")}
    return list(last.values())


def live_restarts(records: Iterable[tuple[dict, dict]]) -> list[float]:
    """Seconds from the controller's restart of a worker (phases_s.restart_at) to the first poll that
    sees the new incarnation SERVING: process start, imports, weights, warm-up (within a poll)."""
    out: dict[tuple, float] = {}
    for d, w in records:
        ph = w.get("phases_s") or {}
        key = (d["segment"], w["id"], w["epoch"])
        if w["epoch"] > 1 and w["state"] == "serving" and "restart_at" in ph and key not in out:
            out[key] = d["t"] - ph["restart_at"]
    return list(out.values())


def drift_before_failure(live: Path, live_runs: list[dict]) -> list[dict]:
    """Per seed: the requests that finished before the failure was injected, in the failure run and
    in its reference run (same workload): mean TTFT and TPOT of each. The failure cannot have changed
    these, so a difference is the box running the two runs at a different speed -- which a profile
    of the reference runs cannot know about."""
    from lumen.metrics.records import RequestRecord, tpot, ttft

    def read_records(path: Path) -> list[RequestRecord]:
        with path.open() as f:
            return [RequestRecord.from_dict(json.loads(line)) for line in f if line.strip()]

    out = []
    for r in live_runs:
        if r["policy"] == "no-failure" or not r.get("failure_times"):
            continue
        seed, t_fail = r["seed"], min(r["failure_times"])
        fail = {x.req_id: x for x in read_records(live / "records" / f"{r['policy']}-seed{seed}.jsonl")}
        ref = {x.req_id: x for x in read_records(live / "records" / f"no-failure-seed{seed}.jsonl")}
        ids = [i for i, x in fail.items() if i in ref and x.finish is not None and x.finish < t_fail]
        row = {"seed": seed, "requests": len(ids), "failure_at_s": t_fail}
        for name, recs in (("reference", ref), ("failure_run", fail)):
            row[f"{name}_ttft_mean"] = _mean([ttft(recs[i]) for i in ids])
            row[f"{name}_tpot_mean"] = _mean([tpot(recs[i]) for i in ids])
        out.append(row)
    return out


def _func_time(stats: pstats.Stats, file_part: str, name: str) -> tuple[int, float, float]:
    """(calls, total cumulative s, own s) of the functions called `name` in files containing file_part."""
    calls, cum, own = 0, 0.0, 0.0
    for (fn, _line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and file_part in fn:
            calls += nc
            cum += ct
            own += tt
    return calls, cum, own


def worker_profile_breakdown(done_dir: Path) -> list[dict]:
    out = []
    for p in sorted(done_dir.glob("*.prof")):
        st = pstats.Stats(str(p))
        run_calls, run_s, _ = _func_time(st, "runtime/worker.py", "run")
        step_calls, step_s, _ = _func_time(st, "engine/engine.py", "step")
        fwd_calls, fwd_s, _ = _func_time(st, "engine/model_runner.py", "forward")
        smp_calls, smp_s, _ = _func_time(st, "engine/sampler.py", "__call__")
        acc_calls, _, _ = _func_time(st, "engine/engine.py", "_account")
        poll_calls, poll_s, _ = _func_time(st, "runtime/worker.py", "_poll")
        send_calls, send_s, _ = _func_time(st, "runtime/worker.py", "_send_outputs")
        pages_calls, pages_s, _ = _func_time(st, "runtime/worker.py", "_stream_pages")
        pub_calls, pub_s, _ = _func_time(st, "runtime/worker.py", "_publish_stats")
        out.append({"file": p.name, "loop_s": run_s, "loop_turns": pages_calls, "engine_steps": acc_calls,
                    "engine_step_s": step_s, "forward_s": fwd_s, "forward_calls": fwd_calls,
                    "sampler_s": smp_s, "poll_s": poll_s, "send_outputs_s": send_s,
                    "stream_pages_s": pages_s, "publish_stats_s": pub_s})
    return out


def run_profile(args, out: Path, log: dict) -> Path:
    csv_path = out / "profile.csv"
    if args.profile:
        shutil.copy(args.profile, csv_path)
        log["profile"] = {"reused": str(args.profile)}
        return csv_path
    cmd = ["lumen", "profile", "--model", args.model, "--device", "cpu", "--out", str(csv_path),
           "--repeats", str(args.profile_repeats)]
    # shared: one thread per worker, and co-located rows; slots: a worker has the whole CPU in its slot
    cmd += ["--procs", str(args.workers)] if args.device_share == "shared" else \
        ["--threads", str(len(os.sched_getaffinity(0)))]
    before = uptime()
    t0 = time.time()
    subprocess.run(cmd, check=True)
    log["profile"] = {"command": " ".join(cmd), "uptime_before": before, "uptime_after": uptime(),
                      "wall_s": time.time() - t0}
    return csv_path


def run_live(args, out: Path, log: dict) -> Path:
    live = out / "live"
    port = args.port or free_port()
    cmd = ["lumen", "bench", "--model", args.model, "--workers", str(args.workers), "--policy", "stop-restart",
           "--qps", str(args.qps), "--requests", str(args.requests), "--lengths", args.lengths,
           "--fail", f"t={args.fail_at:g}s:worker={args.fail_worker}:SIGKILL", "--repeats", str(args.repeats),
           "--seed", str(args.seed), "--window", str(args.window), "--port", str(port), "--out", str(live),
           "--device-share", args.device_share, "--slot-ms", str(args.slot_ms), "--quiet"]
    for flag, v in (("--max-prompt", args.max_prompt), ("--max-output", args.max_output)):
        cmd += [flag, str(v)] if v else []
    env = dict(os.environ)
    if args.profile_from == "live":
        env["LUMEN_STEP_LOG"] = str(live / "step_log")
    prof_dir = None
    if args.worker_profile:
        prof_dir = live / "worker_prof"
        env["LUMEN_WORKER_PROFILE"] = str(prof_dir)
    before = uptime()
    t0 = time.time()
    live.mkdir(parents=True, exist_ok=True)
    with Poller(port, live / "cluster_polls.jsonl", prof_dir=prof_dir) as poller:
        subprocess.run(cmd, check=True, env=env)
    extra = "".join(f"  (env {k}={env[k]})" for k in ("LUMEN_WORKER_PROFILE", "LUMEN_STEP_LOG") if k in env
                    and env.get(k) != os.environ.get(k))
    log["live"] = {"command": " ".join(cmd) + extra,
                   "uptime_before": before, "uptime_after": uptime(), "wall_s": time.time() - t0,
                   "load1_during": {"mean": sum(poller.loads) / max(1, len(poller.loads)),
                                    "min": min(poller.loads, default=math.nan),
                                    "max": max(poller.loads, default=math.nan)}}
    return live


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def run_spans(live: Path) -> dict[str, tuple[float, float]]:
    """Wall-clock span of each bench run's cluster, e.g. {"no-failure-seed0": (start, end)}: from the
    first timestamped line of its log (`lumen serve` starting, local time) to the log's last write
    (the cluster stopping). The bench starts one cluster per run, one after the other."""
    spans = {}
    for p in sorted((live / "logs").glob("*.log")):
        start = None
        with p.open(errors="replace") as f:
            for line in f:
                m = _LOG_TIME.match(line)
                if m:
                    start = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
                    break
        if start is not None:
            spans[p.stem] = (start, p.stat().st_mtime)
    return spans


def step_log_rows(live: Path) -> dict[str, list[dict]]:
    """The LUMEN_STEP_LOG rows of a bench output directory, by run (log name), each row with its
    worker and epoch; rows outside every run's span are under "unassigned"."""
    from lumen.engine.profile import COLUMNS, STEP_LOG_TIME

    spans = run_spans(live)
    out: dict[str, list[dict]] = {k: [] for k in spans}
    out["unassigned"] = []
    for p in sorted((live / "step_log").glob("worker*-epoch*.csv")):
        m = re.match(r"worker(\d+)-epoch(\d+)", p.stem)
        with p.open(newline="") as f:
            for r in csv.DictReader(f):
                row = {c: float(r[c]) for c in (*COLUMNS, STEP_LOG_TIME)}
                row["worker"], row["epoch"] = int(m.group(1)), int(m.group(2))
                run = next((k for k, (a, b) in spans.items() if a <= row[STEP_LOG_TIME] <= b + 1.0), "unassigned")
                out[run].append(row)
    for rows in out.values():
        rows.sort(key=lambda r: (r["worker"], r["epoch"], r["time_s"]))
    return out


def step_stats(rows: list[dict]) -> dict:
    """Per run: steps, mean step time (all / decode-only), and the worker loop's time between two
    back-to-back decode steps of one worker beyond the step itself (both steps decoding: it had work
    throughout), i.e. what a token costs outside the engine step."""
    dec = [r["step_time_s"] for r in rows if r["num_prefill_tokens"] == 0]
    gaps = []
    for a, b in zip(rows, rows[1:], strict=False):
        if (a["worker"], a["epoch"]) == (b["worker"], b["epoch"]) and a["num_decode_seqs"] and b["num_decode_seqs"] \
                and b["num_prefill_tokens"] == 0:
            g = b["time_s"] - a["time_s"] - b["step_time_s"]
            if 0 <= g < 1.0:
                gaps.append(g)
    return {"steps": len(rows), "step_s_mean": _mean([r["step_time_s"] for r in rows]),
            "decode_only_steps": len(dec), "decode_only_step_s_mean": _mean(dec),
            "decode_seqs_mean": _mean([r["num_decode_seqs"] for r in rows]),
            "loop_outside_step_s_mean": _mean(gaps), "loop_gaps": len(gaps)}


def live_profile(live: Path, out: Path, log: dict) -> Path:
    """Merge the failure-free reference runs' step rows into one profile CSV (the profile's columns)."""
    from lumen.engine.profile import COLUMNS

    by_run = step_log_rows(live)
    ref = [r for k, rows in by_run.items() if k.startswith("no-failure") for r in rows]
    if len(ref) < 5:
        raise SystemExit(f"only {len(ref)} step rows from the reference runs under {live / 'step_log'}")
    csv_path = out / "profile_live.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in ref:
            w.writerow([r[c] if c == "step_time_s" else int(r[c]) for c in COLUMNS])
    log["profile"] = {"from": "live (LUMEN_STEP_LOG of the no-failure runs)", "csv": str(csv_path),
                      "rows": len(ref), "per_run": {k: step_stats(v) for k, v in by_run.items()}}
    return csv_path


def fit_mean(csv_path: Path):
    """The simulator's cost model (t = c0 + c1 P + c2 D + c3 C + c4 P^2, lumen.sim.cost.FittedCost)
    fitted by plain non-negative least squares: the mean step time of each batch shape.

    lumen.sim.cost.fit_profile weights rows by 1/t (relative error), right for a `lumen profile`
    grid (one median per point, points spanning orders of magnitude) but not for a live step log:
    thousands of steps of a few shapes with a long right tail (steps that waited for a CPU). There
    the 1/t weighting lands near the typical step, well below the mean -- and mean TTFT and TPOT
    are sums of steps. Measured on runs/fidelityW: decode-only steps of the reference runs 103 ms on
    average, the relative fit's 1-decode step 73 ms, the mean fit's 96 ms."""
    import numpy as np
    from scipy.optimize import nnls

    from lumen.sim.cost import FittedCost, fit_colocated_slowdown, read_profile_rows

    rows = read_profile_rows(csv_path)
    a = np.asarray([r[:4] for r in rows if r[4] == 0], dtype=np.float64)
    p, d, c, y = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    x = np.stack([np.ones_like(p), p, d, c, p * p], axis=1)
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)  # as fit_profile: P^2 must not swamp the rest
    sol, _ = nnls(x / scale, y)
    coef = sol / scale
    pred = x @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    base = FittedCost(tuple(float(v) for v in coef), len(y),  # type: ignore[arg-type]
                      1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan,
                      float(np.mean(np.abs(pred - y) / y)))
    return replace(base, colocated_slowdown=fit_colocated_slowdown(base, rows))


def run_sim(args, csv_path: Path, log: dict, colocated: bool = True) -> tuple[list, object]:
    """colocated: the workers share one host (nodes=1) and the profile's co-located slowdown
    applies; False: independent workers (the cost model without it)."""
    from lumen.metrics import NO_FAILURE, summarize_run
    from lumen.sim import simulate
    from lumen.sim.config import FailurePlan, SimConfig, parse_fail
    from lumen.sim.cost import MODELS, load_profile
    from lumen.sim.experiment import WorkloadSpec

    cost = fit_mean(csv_path) if args.fit == "mean" else load_profile(csv_path)
    if not colocated:
        cost = replace(cost, colocated_slowdown=0.0)
    # the live restart time already contains weight loading and warm-up: the simulator's own
    # reload of the 135M model (bytes / disk, bytes / h2d) is subtracted, warm-up set to 0
    shape = MODELS["smollm2-135m"]
    reload = shape.weight_bytes / 2e9 + shape.weight_bytes / 26e9
    # slots: every worker on the one CPU, taking turns in the live cluster's slots
    slots = dict(workers_per_device=args.workers, device_share="slots", slot_ms=args.slot_ms_live) \
        if args.device_share == "slots" else {}
    cfg = SimConfig(workers=args.workers, model="smollm2-135m", device="h100", tp=1, chunk_tokens=args.chunk_tokens,
                    kv_tokens=args.kv_tokens, detect_s=args.detect_s, restart_s=max(0.0, args.restart_s - reload),
                    warmup_s=0.0, nodes=1, cost=cost, **slots)
    wl = WorkloadSpec(args.requests, args.qps, args.lengths, max_prompt=args.max_prompt, max_output=args.max_output)
    fails = FailurePlan((parse_fail(f"t={args.fail_at:g}s:worker={args.fail_worker}"),))
    summaries = []
    window = args.window_n
    for seed in range(args.seed, args.seed + args.repeats):
        specs = wl.build(seed)
        base = simulate(cfg, specs, "stop-restart", None, seed)
        summaries.append(summarize_run(base.records, base.records, window=window, policy=NO_FAILURE, seed=seed))
        res = simulate(cfg, specs, "stop-restart", fails, seed)
        summaries.append(summarize_run(res.records, base.records, window=window, policy="stop-restart", seed=seed,
                                       failure_times=res.failure_times, not_before=min(res.failure_times)))
    log["sim_colocated" if colocated else "sim_independent"] = {"cost_coef": list(cost.coef), "fit_rows": cost.rows, "fit_r2": cost.r2,
                  "fit_mean_abs_rel_err": cost.mean_abs_rel_err, "colocated_slowdown": cost.colocated_slowdown,
                  "nodes": cfg.nodes, "kv_tokens": args.kv_tokens,
                  "chunk_tokens": args.chunk_tokens, "detect_s": args.detect_s, "restart_s": args.restart_s,
                  "fit": args.fit, "device_share": args.device_share,
                  "slot_ms": args.slot_ms_live if args.device_share == "slots" else None}
    return summaries, cost


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def compare(live_runs: list[dict], sim_runs: list, metrics=("ttft_mean", "tpot_mean", "recovery_time_s")) -> list[dict]:
    rows = []
    for policy in ("no-failure", "stop-restart"):
        for m in metrics:
            if policy == "no-failure" and m == "recovery_time_s":
                continue
            lv = [r[m] for r in live_runs if r["policy"] == policy]
            sv = [getattr(s, m) for s in sim_runs if s.policy == policy]
            lm, sm = _mean(lv), _mean(sv)
            rows.append({"run": policy, "metric": m, "live": lm, "sim": sm, "live_per_seed": lv,
                         "sim_per_seed": sv, "gap_pct": 100 * (sm - lm) / lm if lm else math.nan})
    return rows


def step_check(cost, counters: list[dict], breakdown: list[dict]) -> dict:
    """The profile's prediction of the live engine's forward time for the steps the live workers ran
    (from their counters), against what the worker profiles measured."""
    out: dict = {}
    steps = sum(c["steps"] or 0 for c in counters)
    pre = sum(c["prefill_tokens"] or 0 for c in counters)
    dec = sum(c["decode_tokens"] or 0 for c in counters)
    c0, c1, c2, _c3, _c4 = cost.coef
    out["live_counters"] = {"steps": steps, "prefill_tokens": pre, "decode_tokens": dec}
    # context term omitted (c3 * C is < 1% of a step at these lengths); the P^2 term likewise
    out["predicted_forward_s_without_context"] = c0 * steps + c1 * pre + c2 * dec
    if breakdown:
        tot = {k: sum(b[k] for b in breakdown) for k in breakdown[0] if k != "file"}
        out["worker_profile_totals"] = tot
        if tot["engine_steps"]:
            n = tot["engine_steps"]
            out["per_step_ms"] = {"forward+sampler": 1e3 * (tot["forward_s"] + tot["sampler_s"]) / n,
                                  "engine_step": 1e3 * tot["engine_step_s"] / n,
                                  "loop_outside_step_incl_idle_wait": 1e3 * (tot["loop_s"] - tot["engine_step_s"]) / n,
                                  "loop_work_outside_step": 1e3 * (tot["send_outputs_s"] + tot["publish_stats_s"]
                                                                   + tot["stream_pages_s"]) / n}
    return out


def live_slot_ms(args, polls: list[tuple[dict, dict]]) -> float:
    """The live cluster's slot length: as /lumen/cluster reported it, else as `lumen serve` computes it."""
    reported = [d["slot_ms"] for d, _ in polls if d.get("slot_ms")]
    if reported:
        return float(reported[0])
    import torch

    from lumen.model.loader import read_config
    from lumen.runtime.model_dirs import resolve_model_dir
    from lumen.runtime.server import _slot_ms

    return _slot_ms(args.slot_ms, read_config(resolve_model_dir(args.model)).weight_bytes(torch.float32), "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/sim_fidelity")
    ap.add_argument("--model", default="default")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--qps", type=float, default=0.3)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--lengths", default="fixed:32:32")
    ap.add_argument("--max-prompt", type=int, default=None, help="clip prompt tokens (bench and sim)")
    ap.add_argument("--max-output", type=int, default=None, help="clip output tokens (bench and sim)")
    ap.add_argument("--fail-at", type=float, default=30.0, help="seconds after the replay starts")
    ap.add_argument("--fail-worker", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", default="auto", help="bench recovery window (auto: requests // 12, at least 5)")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="the CPU engine's token budget")
    ap.add_argument("--kv-tokens", type=int, default=DEFAULT_KV_TOKENS)
    ap.add_argument("--detect-s", type=float, default=0.3, help="3 missed 100 ms heartbeats, as the live controller")
    ap.add_argument("--restart-s", type=float, default=None,
                    help="sim: declared dead -> process up; default: measured from the live run's reload phases")
    ap.add_argument("--profile", default=None, help="reuse this profile CSV instead of running `lumen profile`")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--profile-from", choices=("separate", "live"), default="separate",
                    help="separate: `lumen profile` before the bench; live: the live reference runs' own steps "
                         "(LUMEN_STEP_LOG), merged into OUT/profile_live.csv")
    ap.add_argument("--fit", choices=("auto", "relative", "mean"), default="auto",
                    help="cost fit: relative (lumen.sim.cost, 1/t weights: a profile grid), mean (plain least "
                         "squares: the mean step per shape, for live step logs; see fit_mean); auto: mean with "
                         "--profile-from live, else relative")
    ap.add_argument("--live", default=None, help="reuse this `lumen bench` output directory instead of running it")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--device-share", choices=("shared", "slots"), default="shared",
                    help="live: `lumen bench --device-share`; sim: slots puts all workers on one device, taking "
                         "turns in the live cluster's slots (shared: independent workers, as before)")
    ap.add_argument("--slot-ms", default="auto", help="with --device-share slots: `lumen bench --slot-ms` (the sim "
                                                      "uses the slot length the live cluster reports)")
    ap.add_argument("--worker-profile", action="store_true", help="run the live workers under cProfile")
    args = ap.parse_args(argv)
    if args.fit == "auto":
        args.fit = "mean" if args.profile_from == "live" else "relative"
    args.window_n = None if args.window == "auto" else int(args.window)
    if args.window_n is None:
        args.window_n = max(5, args.requests // 12)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "nproc": os.cpu_count(),
                 "argv": sys.argv, "config": {k: v for k, v in vars(args).items()}}
    csv_path = run_profile(args, out, log) if args.profile_from == "separate" else None
    live = Path(args.live) if args.live else run_live(args, out, log)
    if csv_path is None:
        csv_path = live_profile(live, out, log)
    live_doc = json.loads((live / "results.json").read_text())
    polls_path = live / "cluster_polls.jsonl"
    polls = list(poll_records(polls_path)) if polls_path.exists() else []  # read once, used three times
    counters = engine_counters(polls)
    if args.restart_s is None:
        # the killed worker's restart as the live cluster reported it (process start + imports +
        # weights + warm-up): the simulator's restart_s, less its own weight-load time
        restarts = live_restarts(polls)
        args.restart_s = _mean(restarts) if restarts else 2.0
        log["restart_s_from_live"] = restarts
    if args.device_share == "slots":
        args.slot_ms_live = log["slot_ms_live"] = live_slot_ms(args, polls)
    variants = {}
    for name, colocated in (("independent", False), ("colocated", True)):
        runs, cost = run_sim(args, csv_path, log, colocated=colocated)
        variants[name] = {"runs": runs, "cost": cost, "rows": compare(live_doc["runs"], runs)}
    cost = variants["colocated"]["cost"]
    rows = variants["colocated"]["rows"]
    done = live / "worker_prof" / "done"
    breakdown = worker_profile_breakdown(done) if done.is_dir() else []
    if polls_path.exists():
        log["live_worker_cpu"] = cpu_share(polls)
    first = [c for c in counters if c["epoch"] == 1] or counters
    log["step_check"] = step_check(cost, first, breakdown)
    log["step_check"]["per_profile_file"] = breakdown
    log["live_counters"] = counters
    log["comparison"] = rows
    log["live_drift_before_failure"] = drift_before_failure(live, live_doc["runs"])
    log["comparison_independent_workers"] = variants["independent"]["rows"]
    log["sim_runs"] = [s.to_dict() for s in variants["colocated"]["runs"]]
    log["sim_runs_independent_workers"] = [s.to_dict() for s in variants["independent"]["runs"]]
    (out / "fidelity.json").write_text(json.dumps(log, indent=2, default=str))

    print(f"\nprofile: {log.get('profile', {}).get('uptime_before', '')}  ->  {log.get('profile', {}).get('uptime_after', '')}")
    if "live" in log:
        print(f"live:    {log['live']['uptime_before']}  ->  {log['live']['uptime_after']}")
    print(f"fit ({args.fit}): coef {[f'{c:.3g}' for c in cost.coef]}, R2 {cost.r2:.3f}, mean |rel err| {cost.mean_abs_rel_err:.1%}, "
          f"co-located slowdown s = {cost.colocated_slowdown:.3f}; sim restart_s from live: {args.restart_s:.2f}"
          + (f"; slots of {args.slot_ms_live:g} ms" if args.device_share == "slots" else ""))
    for name, v in variants.items():
        print(f"\nsim with {'co-located slowdown (nodes=1)' if name == 'colocated' else 'independent workers (s=0)'}")
        _print_rows(v["rows"])
    for d in log["live_drift_before_failure"]:
        print(f"live, the {d['requests']} requests done before the failure (seed {d['seed']}): failure run vs its "
              f"reference run: TTFT {1e3 * d['failure_run_ttft_mean']:.0f} vs {1e3 * d['reference_ttft_mean']:.0f} ms, "
              f"TPOT {1e3 * d['failure_run_tpot_mean']:.0f} vs {1e3 * d['reference_tpot_mean']:.0f} ms")
    sc = log["step_check"]
    if "per_step_ms" in sc:
        print(f"\nlive worker profile, per engine step: {json.dumps({k: round(v, 1) for k, v in sc['per_step_ms'].items()})}")
    if sc.get("live_counters", {}).get("steps"):
        print(f"live engine counters (all runs, first incarnations): {sc['live_counters']}; the profile's fit predicts "
              f"{sc['predicted_forward_s_without_context']:.1f} s of steps for them without co-location")
    if log.get("live_worker_cpu", {}).get("on_cpu_s"):
        c = log["live_worker_cpu"]
        print(f"live workers while serving: {c['on_cpu_s']:.1f} s on a CPU, {c['runqueue_wait_s']:.1f} s runnable but "
              f"waiting for one ({c['share_of_runnable_time_on_cpu']:.0%} of runnable time on a CPU)")
    if "per_run" in log.get("profile", {}):
        print(f"\nlive step log ({log['profile']['rows']} reference rows -> {log['profile']['csv']}):")
        for k, st in log["profile"]["per_run"].items():
            if st["steps"]:
                print(f"  {k:<22}{st['steps']:>6} steps, mean step {1e3 * st['step_s_mean']:.1f} ms, decode-only "
                      f"{1e3 * st['decode_only_step_s_mean']:.1f} ms ({st['decode_only_steps']}), mean decodes/step "
                      f"{st['decode_seqs_mean']:.2f}, loop outside the step {1e3 * st['loop_outside_step_s_mean']:.1f} ms "
                      f"per decode step ({st['loop_gaps']})")
    print(f"\nwrote {out / 'fidelity.json'}")
    return 0


def _print_rows(rows: list[dict]) -> None:
    print(f"{'run':<14}{'metric':<17}{'live':>10}{'sim':>10}{'gap':>9}   per seed live / sim")
    for r in rows:
        scale = 1e3 if r["metric"] != "recovery_time_s" else 1.0
        unit = "ms" if scale == 1e3 else "s"
        per = " ".join(f"{x * scale:.0f}" if x is not None and math.isfinite(x) else "-" for x in r["live_per_seed"])
        per_s = " ".join(f"{x * scale:.0f}" if math.isfinite(x) else "-" for x in r["sim_per_seed"])
        print(f"{r['run']:<14}{r['metric'] + ' (' + unit + ')':<17}{r['live'] * scale:>10.1f}{r['sim'] * scale:>10.1f}"
              f"{r['gap_pct']:>+8.1f}%   {per} / {per_s}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
