"""Latency of a `lumen bench` directory's runs in three phases: before the kill, between the kill and
the killed worker's return (its next epoch SERVING), and after. Mean TTFT and TPOT of the requests
arriving in each phase, per run; a no-failure run is cut at the median times of the failure runs of
its seed, so each phase has a failure-free reference.

Why: the window-based recovery time says *that* TTFT left the no-failure band, not whether the failure
cost capacity. On one H200 shared by 4 workers (run 4, 2026-12-04) TTFT and TPOT *fell* between the
kill and the return under every policy: the dead worker's GPU time went to the survivors.

    python benchmarks/phase_latency.py RUNS_DIR [--out FILE]
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import sys
from pathlib import Path

from bench_dir import last_attempt, main_over_runs

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
KILLED = re.compile(r"worker (\d+) \(epoch (\d+), pid \d+\) exited with -")


def _wall(line: str) -> float | None:
    m = STAMP.match(line)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def phase_bounds(run_json: Path, log: Path) -> tuple[float, float | None] | None:
    """(kill, return) in the run's own clock (seconds since its first request): the bench's own
    `outage_end_s` where the run has it (lumen bench since abb5879), else the first injected event
    and the cluster log (the killed worker's next epoch going SERVING); None without a kill."""
    meta = json.loads(run_json.read_text())
    events = [e for e in meta.get("events") or [] if e.get("injected_s") is not None]
    if not events:
        return None
    kill_s = min(float(e["injected_s"]) for e in events)
    if isinstance(meta.get("outage_end_s"), (int, float)):
        return kill_s, float(meta["outage_end_s"])
    text = last_attempt(log)
    if text is None:
        return None
    kill_wall = back_wall = None
    for line in text.splitlines():
        m = KILLED.search(line)
        if m and kill_wall is None:
            worker, epoch, kill_wall = m.group(1), int(m.group(2)), _wall(line)
            back = f"worker {worker} epoch {epoch + 1}: switching -> serving"
        elif kill_wall is not None and back in line:
            back_wall = _wall(line)
            break
    if kill_wall is None:
        return kill_s, None
    return kill_s, (kill_s + back_wall - kill_wall) if back_wall is not None else None


def phase_means(records: Path, bounds: tuple[float, float]) -> list[dict]:
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    cuts = [(0.0, bounds[0]), bounds, (bounds[1], float("inf"))]
    out = []
    for lo, hi in cuts:
        rs = [r for r in rows if lo <= r["arrival"] < hi and r.get("first_token") is not None]
        tpots = [(r["token_times"][-1] - r["token_times"][0]) / (len(r["token_times"]) - 1)
                 for r in rs if len(r.get("token_times") or []) > 1]
        out.append({"n": len(rs),
                    "ttft_ms": 1e3 * statistics.fmean(r["first_token"] - r["arrival"] for r in rs) if rs else None,
                    "tpot_ms": 1e3 * statistics.fmean(tpots) if tpots else None})
    return out


def _cells(phases: list[dict], key: str) -> str:
    return " ".join(f"{p[key]:7.1f}" if p[key] is not None else "      -" for p in phases)


def report(runs_dir: Path, runs: list[tuple[str, Path]]) -> list[str]:
    bounds, by_seed = {}, {}
    for label, f in runs:
        b = phase_bounds(f, runs_dir / "logs" / f"{label}.log")
        if b is not None and b[1] is not None:
            bounds[label] = b
            by_seed.setdefault(label.rsplit("-seed", 1)[1], []).append(b)
    lines = [f"{'run':24s} {'kill..back s':>13s} | TTFT ms: before  kill..back  after | TPOT ms: before  kill..back  after"]
    borrowed = False
    for label, _ in runs:
        b, mark = bounds.get(label), ""
        if b is None:  # a no-failure run (or a failure run whose worker never came back): its seed's cuts
            seen = by_seed.get(label.rsplit("-seed", 1)[1])
            if not seen:
                lines.append(f"{label:24s} (no kill and no failure run of this seed to cut at)")
                continue
            b = (statistics.median(x[0] for x in seen), statistics.median(x[1] for x in seen))
            mark, borrowed = " *", True
        ph = phase_means(runs_dir / "records" / f"{label}.jsonl", b)
        lines.append(f"{label + mark:24s} {b[0]:5.1f}..{b[1]:5.1f} | {_cells(ph, 'ttft_ms')} | {_cells(ph, 'tpot_ms')}")
    if borrowed:
        lines.append("* cut at the median times of its seed's failure runs (no kill of its own, or its return unknown)")
    return lines


if __name__ == "__main__":
    sys.exit(main_over_runs(__doc__.split("\n\n")[0], report))
