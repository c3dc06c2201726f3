"""Simulator speed: wall time, events/s and peak memory (issue 7 benchmarks; not a timed test).

    python benchmarks/simulator.py                    # both cases
    python benchmarks/simulator.py --case small       # 64 workers x 15,000 requests (target <= 10 s)
    python benchmarks/simulator.py --case large       # 1,024 workers x 1,000,000 requests (<= 5 min)

Each case runs in its own subprocess so its peak RSS (ru_maxrss) is its own. Setup: the paper's
scaling experiment -- Llama-3-70B on 4 A100s per worker, Splitwise conversation lengths, Poisson
arrivals at 1.4 QPS per worker, 25% of the workers failing together at 30% of the arrival span,
policy lumen (the most work per request: placement, streaming, shedding, speculation).
Wall time counts the simulation only; building the workload is reported separately.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

CASES = {"small": (64, 15_000, 10.0), "large": (1024, 1_000_000, 300.0)}


def run_case(workers: int, requests: int, policy: str, seed: int) -> dict:
    from lumen.sim import FailurePlan, FailureSpec, SimConfig, simulate
    from lumen.workload import make_workload

    t0 = time.perf_counter()
    wl = make_workload(requests, 1.4 * workers, "splitwise-conv", seed=seed)
    t_wl = time.perf_counter() - t0
    plan = FailurePlan((FailureSpec(0.3, frac=0.25, t_frac=True),))
    t0 = time.perf_counter()
    res = simulate(SimConfig(workers=workers), wl, policy, plan, seed=seed)
    wall = time.perf_counter() - t0
    st = res.stats
    return {
        "workers": workers, "requests": requests, "policy": policy, "seed": seed,
        "wall_s": round(wall, 2), "workload_build_s": round(t_wl, 2),
        "events": st.events, "events_per_s": round(st.events / wall),
        "iterations_simulated": st.iterations, "epochs": st.steps,
        "simulated_s": round(res.end_time, 1), "failures": st.failures, "interrupted": st.interrupted,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "completed": sum(r.finish is not None for r in res.records),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--policy", default="lumen")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="append results as JSON lines to this file")
    p.add_argument("--_child", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(run_case(a._child[0], a._child[1], a.policy, a.seed)))
        return 0
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(meta))
    for name in (CASES if a.case == "all" else [a.case]):
        w, n, target = CASES[name]
        out = subprocess.run([sys.executable, __file__, "--_child", str(w), str(n), "--policy", a.policy,
                              "--seed", str(a.seed)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(case=name, target_s=target, within_target=r["wall_s"] <= target, **meta)
        print(json.dumps(r))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
