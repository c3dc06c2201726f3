"""The simulator against the one live GPU run under time slots (issue 23 item 5, partial).

    python benchmarks/sim_fidelity_share.py --out docs/results/sim-fidelity-gpu-2026-12-07

Simulates `benchmarks/device_share.py --max-batch 16 --max-tokens 256` as run on one H100 on 2026-12-07
(docs/results/device-share-gpu-2026-12-07/): 4 workers of the Qwen3-8B shape on one device, each batch
capped at 16, prompts of 32 token ids and 256 generated tokens, worker 1 SIGKILLed at 40 s and kept down,
per-worker generated (decode-phase) tokens/s over the bench's windows (before: 15-40 s, after: 45-70 s).
The step cost is the fit of that run's `lumen profile --quick` CSV (`--profile`).

The simulator has no closed loop: the load is an open one high enough that every worker's batch stays
full (`--arrival poisson` at `--qps`, or `burst`: every request at t = 0, so that batches start and end
together as the closed loop's did). Cases:

  shared        --device-share shared, worker 1 fails at 40 s, restart held off (restart_s = 1e6)
  slots-3       --device-share slots --slot-ms 70, worker 1 fails at t = 0 and stays down: its slot is
                empty for the whole run, as the live worker 1's was (it never served: the bug since fixed);
                the "kill" at 40 s changes nothing, as in the live run
  slots-4       the same with all 4 serving until worker 1 fails at 40 s (what the fixed code would do;
                no live measurement)

Per-worker tokens are counted by wrapping `Simulator._apply` (n iterations of D decoding requests,
g tokens each, spread evenly over the epoch's span): the same counter as the live `decode_tokens`.
Nothing under src/ is changed.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

from lumen.sim import FailurePlan, FailureSpec, SimConfig, load_profile
from lumen.sim.core import Simulator
from lumen.workload import make_workload

DATA = Path("docs/results/device-share-gpu-2026-12-07")
BEFORE = (15.0, 40.0)
AFTER = (45.0, 70.0)
KILL_AT = 40.0


def measured() -> dict:
    d = json.loads((DATA / "share_results.json").read_text())
    out = {}
    for run in d["runs"]:
        out[run["mode"]] = {int(k): v for k, v in run["workers"].items()}
    return out


def run_case(cfg: SimConfig, workload, fail_at: float, seed: int) -> dict:
    sim = Simulator(cfg, workload, "stop-restart", FailurePlan((FailureSpec(fail_at, workers=(1,)),)), seed)
    spans: list[tuple[int, float, float, float]] = []   # (worker, start, end, decode tokens)
    orig = sim._apply

    def apply(w, n, t):
        toks = n * w.ep_g * len(w.heap)
        if toks:
            spans.append((w.id, w.ep_start, t, toks))
        return orig(w, n, t)

    sim._apply = apply   # type: ignore[method-assign]
    t0 = time.perf_counter()
    res = sim.run()
    wall = time.perf_counter() - t0

    def rate(wid: int, a: float, b: float) -> float:
        tok = 0.0
        for w, s, e, n in spans:
            if w != wid or e <= a or s >= b:
                continue
            if e <= s:
                tok += n if a <= e < b else 0.0
            else:
                tok += n * (min(e, b) - max(s, a)) / (e - s)
        return tok / (b - a)

    workers = {}
    for wid in range(cfg.workers):
        bef, aft = rate(wid, *BEFORE), rate(wid, *AFTER)
        workers[wid] = {"before_tok_s": bef, "after_tok_s": aft if wid != 1 else None,
                        "after_over_before": (aft / bef) if wid != 1 and bef > 0 else None}
    st = res.stats
    return {"workers": workers, "sim_wall_s": wall, "end_time": res.end_time,
            "errors": sum(1 for r in res.records if r.error),
            "iterations": st.iterations, "steps": st.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=str(DATA / "block" / "profile_gpu.csv"))
    ap.add_argument("--arrival", choices=("poisson", "burst"), action="append")
    ap.add_argument("--qps", type=float, default=12.0, help="poisson: arrivals per second (capacity is ~7.6)")
    ap.add_argument("--duration-s", type=float, default=75.0, help="poisson: arrivals span this long")
    ap.add_argument("--burst-requests", type=int, default=1000)
    ap.add_argument("--kv-tokens", type=int, default=8000, help="live: --num-blocks 500 of 16 tokens")
    ap.add_argument("--slot-ms", type=float, default=70.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--c0-scale", type=float, default=None,
                    help="diagnostic: scale the fitted per-step constant c0 by this (sensitivity to the decode step)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    arrivals = a.arrival or ["poisson", "burst"]
    cost = load_profile(a.profile)
    if a.c0_scale is not None:
        from dataclasses import replace
        c = list(cost.coef)
        c[0] *= a.c0_scale
        cost = replace(cost, coef=tuple(c))
    a.out.mkdir(parents=True, exist_ok=True)
    meas = measured()
    base = dict(workers=4, model="qwen3-8b", device="h100", tp=1, workers_per_device=4, max_batch=16,
                kv_tokens=a.kv_tokens, chunk_tokens=1024, restart_s=1e6, detect_s=0.3, cost=cost)
    cases = {
        "shared": (SimConfig(device_share="shared", **base), KILL_AT, "shared"),
        "slots-3": (SimConfig(device_share="slots", slot_ms=a.slot_ms, **base), 0.0, "slots"),
        "slots-4": (SimConfig(device_share="slots", slot_ms=a.slot_ms, **base), KILL_AT, None),
    }
    step = {f"decode_{d}": cost.step_time(0, d, d * 160) for d in (1, 4, 16)}
    step["prefill_32_plus_15_decode"] = cost.step_time(32, 15, 15 * 160 + 32)
    step["prefill_512"] = cost.step_time(512, 0, 512)
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
              "python": platform.python_version(), "argv": {k: str(v) for k, v in vars(a).items()},
              "cost": {"coef": cost.coef, "rows": cost.rows, "r2": cost.r2,
                       "mean_abs_rel_err": cost.mean_abs_rel_err, "colocated_slowdown": cost.colocated_slowdown,
                       "step_time_s": step},
              "windows": {"before": BEFORE, "after": AFTER, "kill_at": KILL_AT}, "runs": []}
    rows = []
    for arr in arrivals:
        if arr == "poisson":
            wl = make_workload(int(a.qps * a.duration_s), a.qps, "fixed:32:256", seed=a.seed)
        else:
            wl = make_workload(a.burst_requests, 1e9, "fixed:32:256", seed=a.seed)
        for name, (cfg, fail_at, mode) in cases.items():
            r = run_case(cfg, wl, fail_at, a.seed)
            r.update(case=name, arrival=arr, fail_at=fail_at, slot_s=cfg.slot_s if cfg.device_share == "slots" else None)
            result["runs"].append(r)
            for wid, v in r["workers"].items():
                m = meas.get(mode, {}).get(wid, {}) if mode else {}
                for when in ("before", "after"):
                    sim_v = v[f"{when}_tok_s"]
                    live_v = m.get(f"{when}_tok_s")
                    if sim_v is None:
                        continue
                    gap = (sim_v - live_v) / live_v if live_v else None
                    rows.append({"arrival": arr, "case": name, "worker": wid, "window": when,
                                 "sim_tok_s": round(sim_v, 1), "live_tok_s": None if live_v is None else round(live_v, 1),
                                 "gap": None if gap is None else round(gap, 4)})
            serving = [w for w in r["workers"] if not (name == "slots-3" and w == 1)]
            b = sum(r["workers"][w]["before_tok_s"] for w in serving) / len(serving)
            surv = [w for w in serving if w != 1]
            af = sum(r["workers"][w]["after_tok_s"] for w in surv) / len(surv)
            print(f"{arr:8s} {name:8s} per serving worker before {b:7.1f}  survivors after {af:7.1f} "
                  f"({af / b - 1:+.1%})  sim {r['sim_wall_s']:.1f} s, errors {r['errors']}", flush=True)
    tag = ("" if a.c0_scale is None else f"_c0x{a.c0_scale:g}") + ("" if a.seed == 0 else f"_seed{a.seed}")
    (a.out / f"sim_share{tag}.json").write_text(json.dumps(result, indent=1))
    with (a.out / f"sim_share{tag}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(json.dumps(result["cost"], indent=1))


if __name__ == "__main__":
    main()
