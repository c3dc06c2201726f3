"""Issue 25 in the simulator: K checkpoint copies per request against independent and correlated
(whole-domain) failures; 64 workers, 16 failing at t = 60 s, 5 seeds.

Every point runs what `lumen simulate` runs (per seed the seeded workload, the no-failure
stop-restart reference, then each variant with the same failures, summarised by
`lumen.metrics.summarize_run`); a variant is `lumen-no-spec` (or fixed-ckpt) with SimConfig overrides.
The equivalent commands (docs/replicas.md):

    lumen simulate --workers 64 --requests 20000 --qps-per-worker 1.4 --repeats 5 --policy lumen-no-spec \\
        --fail t=60s:count=16 --ckpt-replicas {1,2,3,auto} [--ckpt-worker-mtbf 15m]      # independent
    ... --domains 4 --fail t=60s:domains=1 [--domain-blind] [--ckpt-domain-mtbf 15m]     # one node of 16
    ... --domains 16 --fail t=60s:domains=4                                              # 4 nodes of 4

Reported per variant: interrupted requests, those with a copy, those whose every copy's holder
failed too (the paper's 23.8% at K = 1), those without a surviving copy holding a valid page,
restores, affected TTFT / TPOT, recovery time, TTFT and E2E of the interrupted requests, the
window TTFT (arrivals in the 120 s after the failure), streaming bytes, NIC backlog at the crash,
and the K histogram of `auto`; changes vs K = 1 as per-seed paired differences with Student-t 95% CIs.

    python benchmarks/sim_replicas.py --out docs/results/sim-replicas-2026-12-07                 # all groups
    python benchmarks/sim_replicas.py --only indep --out docs/results/sim-replicas-2026-12-07    # one group
    python benchmarks/sim_replicas.py --plots-only --out docs/results/sim-replicas-2026-12-07
    python benchmarks/sim_replicas.py --check-k1                  # K = 1 against docs/simulation.md 3.2/3.4

One simulator process, no pool (the 2-core box is shared); each group takes 1-3 minutes there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lumen.metrics import NO_FAILURE, aggregate, ci95, summarize_run
from lumen.metrics.records import e2e, mean, ttft
from lumen.sim import FailurePlan, FailureSpec, SimConfig, WorkloadSpec, simulate

SEEDS = 5
WORKERS = 64
QPS_PER_WORKER = 1.4
REQUESTS = 20000
T_FAIL = 60.0
WINDOW_S = 120.0
# what `auto` plans for: the scenarios' own failure rate (16 of 64 workers, or 1 of 4 domains,
# within the ~225 s arrival span: one failure per worker or domain per ~900 s)
PLAN_MTBF_S = 900.0
INDEP = FailurePlan((FailureSpec(T_FAIL, count=16),))
ONE_NODE = FailurePlan((FailureSpec(T_FAIL, domains=1),))
FOUR_RACKS = FailurePlan((FailureSpec(T_FAIL, domains=4),))
REPORTED = ("recovery_time_s", "affected_ttft_mean", "affected_tpot_mean", "ttft_mean", "tpot_mean")
STATS = ("interrupted", "protected_interrupted", "holder_cofailed", "no_valid_copy", "copies_lost",
         "copies_placed", "copies_missing", "unprotected", "reprotected", "restores", "recomputes", "shed",
         "restored_tokens", "recompute_tokens", "stream_bytes", "crash_nic_backlog_s", "failures", "wall_s")
AUTO = {"ckpt_replicas": "auto", "ckpt_worker_mtbf_s": PLAN_MTBF_S}
AUTO_DOM = {**AUTO, "ckpt_domain_mtbf_s": PLAN_MTBF_S}
PF = {"ckpt_stream_order": "primary-first"}
# The checkpoint mechanisms without mechanism 3: copies do not interact with speculation, and its
# pairing rule is being tuned beside this work (lumen's own checkpoint path is the same code).
POL = "lumen-no-spec"


@dataclass(frozen=True)
class Point:
    name: str
    title: str
    plan: FailurePlan
    base: dict            # SimConfig overrides of every variant
    variants: tuple       # (label, policy, SimConfig overrides)
    qps_per_worker: float = QPS_PER_WORKER
    requests: int = REQUESTS


def points() -> list[Point]:
    k123 = (("K=1", POL, {}), ("K=2", POL, {"ckpt_replicas": 2}), ("K=3", POL, {"ckpt_replicas": 3}),
            ("auto", POL, AUTO), ("K=2 pf", POL, {"ckpt_replicas": 2, **PF}),
            ("K=3 pf", POL, {"ckpt_replicas": 3, **PF}), ("auto pf", POL, {**AUTO, **PF}))
    k12 = (("K=1", POL, {}), ("K=2", POL, {"ckpt_replicas": 2}), ("auto", POL, AUTO),
           ("K=2 pf", POL, {"ckpt_replicas": 2, **PF}), ("auto pf", POL, {**AUTO, **PF}))
    k12d = (("K=1", POL, {}), ("K=2", POL, {"ckpt_replicas": 2}), ("auto", POL, AUTO_DOM),
            ("K=2 pf", POL, {"ckpt_replicas": 2, **PF}), ("auto pf", POL, {**AUTO_DOM, **PF}))
    return [
        Point("indep", "independent: 16 of 64 workers, no domains, 10 Gbit/s NIC", INDEP, {}, k123),
        Point("indep26", "independent: 16 of 64 workers, no domains, 2.6 QPS/worker, 40,000 requests",
              INDEP, {}, k12, qps_per_worker=2.6, requests=40000),
        Point("indep25", "independent: 16 of 64 workers, no domains, 25 Gbit/s NIC", INDEP, {"net_gbps": 25.0},
              (("K=1", POL, {}), ("K=2", POL, {"ckpt_replicas": 2}), ("auto", POL, AUTO))),
        Point("spread", "independent: 16 of 64 workers spread over 4 nodes of 16 (placement sees the nodes)",
              INDEP, {"domains": 4}, k12d),
        Point("node", "correlated: 4 nodes of 16, one whole node fails", ONE_NODE, {"domains": 4},
              k12d + (("K=1 blind", POL, {"domain_aware": False}),
                      ("K=2 blind", POL, {"domain_aware": False, "ckpt_replicas": 2}),
                      ("fixed-ckpt K=1", "fixed-ckpt", {}), ("fixed-ckpt K=2", "fixed-ckpt", {"ckpt_replicas": 2}))),
        Point("racks", "correlated: 16 nodes of 4, four whole nodes fail", FOUR_RACKS, {"domains": 16},
              k12d + (("K=1 blind", POL, {"domain_aware": False}),)),
        Point("prices", "independent (as indep): auto at copy prices 1e-3 .. 1e-6 recompute s per NIC s",
              INDEP, {}, tuple((f"auto {x:g}", POL, {**AUTO, "ckpt_price_net": x})
                               for x in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 1e-6))),
    ]


DEFAULT_GROUPS = ("indep", "indep26", "indep25", "spread", "node", "racks", "prices")
_BASE: dict[tuple, object] = {}


def _baseline(key: tuple, seed: int, wl):
    if key not in _BASE:
        _BASE[key] = simulate(SimConfig(workers=WORKERS), wl, "stop-restart", None, seed)
    return _BASE[key]


def _interrupted(records) -> tuple[float, float]:
    rs = [r for r in records if r.interrupted and r.error is None]
    return mean(map(ttft, rs)), mean(map(e2e, rs))


def _window_ttft(records, t_fail: float) -> float:
    return mean(ttft(r) for r in records if t_fail <= r.arrival < t_fail + WINDOW_S and r.error is None)


def run_point(p: Point, seeds: int) -> dict:
    wl_spec = WorkloadSpec(p.requests, p.qps_per_worker * WORKERS)
    summaries, runs = [], []
    t0 = time.perf_counter()
    for seed in range(seeds):
        wl = wl_spec.build(seed)
        base = _baseline((seed, p.requests, p.qps_per_worker), seed, wl)
        summaries.append(summarize_run(base.records, base.records, policy=NO_FAILURE, seed=seed))
        for label, policy, over in p.variants:
            cfg = SimConfig(workers=WORKERS, **{**p.base, **over})
            res = simulate(cfg, wl, policy, p.plan, seed)
            s = replace(summarize_run(res.records, base.records, policy=policy, seed=seed,
                                      failure_times=res.failure_times), policy=label)
            summaries.append(s)
            st = asdict(res.stats)
            it, ie = _interrupted(res.records)
            runs.append({"point": p.name, "policy": label, "seed": seed,
                         **{m: getattr(s, m) for m in REPORTED}, "recovered": s.recovered,
                         "interrupted_ttft_mean": it, "interrupted_e2e_mean": ie,
                         "window_ttft_mean": _window_ttft(res.records, res.failure_times[0]),
                         **{k: st[k] for k in STATS}, "k_hist": st["k_hist"],
                         "policy_calls": st["policy_calls"]})
            print(f"  {p.name} seed {seed} {label}: lost {st['holder_cofailed']}/{st['protected_interrupted']}, "
                  f"{res.stats.wall_s:.1f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    agg = {a.policy: {"recovered": a.recovered, "repeats": a.repeats,
                      **{m: [a.metrics[m].mean, a.metrics[m].half_width] for m in REPORTED}}
           for a in aggregate(summaries)}
    for label, _, _ in p.variants:
        mine = [r for r in runs if r["policy"] == label]
        a = agg[label]
        for m in ("interrupted_ttft_mean", "interrupted_e2e_mean", "window_ttft_mean", "crash_nic_backlog_s"):
            a[m] = list(ci95([r[m] / (r["failures"] if m == "crash_nic_backlog_s" else 1) for r in mine]))
        a["stream_gb"] = list(ci95([r["stream_bytes"] / 1e9 for r in mine]))
        for k in ("interrupted", "protected_interrupted", "holder_cofailed", "no_valid_copy", "copies_lost",
                  "copies_placed", "copies_missing", "restores", "recomputes", "shed", "restored_tokens",
                  "recompute_tokens"):
            a[k] = sum(r[k] for r in mine)
        a["restored_token_share"] = a["restored_tokens"] / max(1, a["restored_tokens"] + a["recompute_tokens"])
        a["lost_share"] = _share(a["holder_cofailed"], a["protected_interrupted"])
        a["lost_share_seeds"] = list(ci95([r["holder_cofailed"] / r["protected_interrupted"] for r in mine
                                           if r["protected_interrupted"]]))
        a["no_valid_share"] = _share(a["no_valid_copy"], a["interrupted"])
        hist: list[int] = []
        for r in mine:
            for k, c in enumerate(r["k_hist"]):
                if k >= len(hist):
                    hist.append(0)
                hist[k] += c
        a["k_hist"] = hist
        # paired changes vs K = 1 (same seed, same failures)
        ref = next((v[0] for v in p.variants if v[0] == "K=1"), None)
        if ref and label != ref:
            refs = {r["seed"]: r for r in runs if r["policy"] == ref}
            for m in ("affected_ttft_mean", "recovery_time_s", "interrupted_e2e_mean", "window_ttft_mean",
                      "stream_bytes"):
                d = [(r[m] - refs[r["seed"]][m]) / refs[r["seed"]][m] for r in mine
                     if math.isfinite(r[m]) and math.isfinite(refs[r["seed"]][m]) and refs[r["seed"]][m]]
                a[f"{m}_vs_k1"] = list(ci95(d))
    return {"point": {"name": p.name, "title": p.title, "plan": [f.to_spec() for f in p.plan.scheduled],
                      "base": p.base, "qps_per_worker": p.qps_per_worker, "requests": p.requests, "variants": [[v[0], v[1], v[2]] for v in p.variants]},
            "wall_s": wall, "aggregates": agg, "runs": runs}


def _share(k: int, n: int) -> list[float]:
    """k/n with its Wilson 95% interval (pooled over seeds): [share, low, high]."""
    if not n:
        return [math.nan, math.nan, math.nan]
    z = 1.959964
    ph = k / n
    d = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / d
    h = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / d
    return [ph, c - h, c + h]


def _fmt(ci, scale=1.0, digits=2) -> str:
    m, h = ci
    if not math.isfinite(m):
        return "-"
    return f"{m * scale:.{digits}f} ± {h * scale:.{digits}f}" if math.isfinite(h) else f"{m * scale:.{digits}f}"


def _pct_ci(ci) -> str:
    m, h = ci
    if not math.isfinite(m):
        return "-"
    return f"{100 * m:+.1f}% ± {100 * h:.1f}" if math.isfinite(h) else f"{100 * m:+.1f}%"


def _sh(s) -> str:
    return "-" if not math.isfinite(s[0]) else f"{100 * s[0]:.1f}% [{100 * s[1]:.1f}, {100 * s[2]:.1f}]"


def print_point(r: dict) -> None:
    p, agg = r["point"], r["aggregates"]
    print(f"\n## {p['name']}: {p['title']}; {', '.join(p['plan'])}; {r['wall_s']:.0f} s")
    print("| variant | interrupted | with a copy | all copies lost | share lost [95% CI] | no valid copy "
          "| restores | tokens restored | stream GB/run | NIC backlog at crash (s) | K histogram |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label in [v[0] for v in p["variants"]]:
        a = agg[label]
        print(f"| {label} | {a['interrupted']} | {a['protected_interrupted']} | {a['holder_cofailed']} "
              f"| {_sh(a['lost_share'])} | {a['no_valid_copy']} ({100 * a['no_valid_share'][0]:.1f}%) "
              f"| {a['restores']} | {100 * a['restored_token_share']:.1f}% | {_fmt(a['stream_gb'], 1, 0)} | {_fmt(a['crash_nic_backlog_s'], 1, 1)} "
              f"| {a['k_hist'] or '-'} |")
    print("\n| variant | recovery (s) | affected TTFT (s) | affected TPOT (ms) | interrupted E2E (s) "
          "| window TTFT (s) | affected TTFT vs K=1 | recovery vs K=1 | interrupted E2E vs K=1 | stream vs K=1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label in [v[0] for v in p["variants"]]:
        a = agg[label]
        print(f"| {label} | {_fmt(a['recovery_time_s'], 1, 1)} | {_fmt(a['affected_ttft_mean'])} "
              f"| {_fmt(a['affected_tpot_mean'], 1e3, 1)} | {_fmt(a['interrupted_e2e_mean'], 1, 1)} "
              f"| {_fmt(a['window_ttft_mean'])} | {_pct_ci(a.get('affected_ttft_mean_vs_k1', [math.nan] * 2))} "
              f"| {_pct_ci(a.get('recovery_time_s_vs_k1', [math.nan] * 2))} "
              f"| {_pct_ci(a.get('interrupted_e2e_mean_vs_k1', [math.nan] * 2))} "
              f"| {_pct_ci(a.get('stream_bytes_vs_k1', [math.nan] * 2))} |")
    sys.stdout.flush()


def write_csv(path: Path, results: list[dict]) -> None:
    rows = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in run.items()}
            for r in results for run in r["runs"]]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plots(out: Path, results: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["point"]["name"]: r for r in results}
    made = []
    # 1. share of protected interrupted requests that lost every copy, per scenario and variant
    groups = [g for g in ("indep", "indep26", "indep25", "spread", "node", "racks") if g in by]
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 4.6), sharey=True)
        axes = axes if len(groups) > 1 else [axes]
        for ax, g in zip(axes, groups, strict=True):
            agg = by[g]["aggregates"]
            labels = [v[0] for v in by[g]["point"]["variants"]]
            ys = [100 * agg[x]["lost_share"][0] for x in labels]
            lo = [100 * (agg[x]["lost_share"][0] - agg[x]["lost_share"][1]) for x in labels]
            hi = [100 * (agg[x]["lost_share"][2] - agg[x]["lost_share"][0]) for x in labels]
            ax.bar(range(len(labels)), ys, yerr=[lo, hi], capsize=3,
                   color=["#4c72b0" if "fixed" not in x else "#999999" for x in labels])
            ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
            ax.set_title(g, fontsize=10)
            ax.axhline(6.0, color="#c44e52", lw=0.8, ls="--")
        axes[0].set_ylabel("all copies lost (% of interrupted with a copy)")
        fig.suptitle("Holder co-failure, 64 workers, 16 failing (5 seeds pooled, Wilson 95% CI; dashed: 6%)",
                     fontsize=10)
        fig.tight_layout()
        made.append(out / "lost_share.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    # 2. protection bought per streamed byte (independent failures, 10 Gbit/s): K = 1, 2, 3 and auto
    # at its copy prices; left: every copy's holder failed, right: no surviving copy with a valid page
    if "indep" in by:
        ind = by["indep"]["aggregates"]
        pri = by["prices"]["aggregates"] if "prices" in by else {}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
        for ax, key, name in ((axes[0], "lost_share", "all copies' holders failed"),
                              (axes[1], "no_valid_share", "no surviving copy with a valid page")):
            for k in ("K=1", "K=2", "K=3"):
                for sfx, mk, col in (("", "o", "#4c72b0"), (" pf", "^", "#55a868")):
                    a = ind.get(k + sfx) or (ind.get(k) if k == "K=1" else None)
                    if a is None or (k == "K=1" and sfx):
                        continue
                    ax.scatter([a["stream_gb"][0]], [100 * a[key][0]], marker=mk, color=col, s=40)
                    ax.annotate(k + sfx, (a["stream_gb"][0], 100 * a[key][0]), textcoords="offset points",
                                xytext=(5, 3 if not sfx else -10), fontsize=8)
            xs = [(a["stream_gb"][0], 100 * a[key][0], lab.split()[1]) for lab, a in pri.items() if lab.startswith("auto")]
            xs.sort()
            if xs:
                ax.plot([x for x, _, _ in xs], [y for _, y, _ in xs], "s-", color="#dd8452", ms=5, lw=0.8)
                for x, y, lab in xs:
                    ax.annotate(lab, (x, y), textcoords="offset points", xytext=(3, 6), fontsize=7, color="#dd8452")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("checkpoint bytes streamed per run (GB, mean of 5 seeds)")
            ax.set_ylabel("% of interrupted requests" + (" with a copy" if key == "lost_share" else ""))
        axes[0].scatter([], [], marker="o", color="#4c72b0", label="K fixed, fifo NIC")
        axes[0].scatter([], [], marker="^", color="#55a868", label="K fixed, primary-first")
        axes[0].plot([], [], "s-", color="#dd8452", label="auto at copy price (recompute s per NIC s)")
        axes[0].legend(fontsize=8)
        fig.suptitle("Independent failures, 16 of 64, 1.4 QPS/worker, 10 Gbit/s NIC", fontsize=10)
        fig.tight_layout()
        made.append(out / "protection_vs_bytes.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    # 3. affected TTFT and interrupted E2E vs K = 1 (paired, 95% CI)
    if groups:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, m, name in ((axes[0], "affected_ttft_mean_vs_k1", "affected TTFT vs K=1 (%)"),
                            (axes[1], "interrupted_e2e_mean_vs_k1", "E2E of interrupted requests vs K=1 (%)")):
            xs, ys, es, cols = [], [], [], []
            for g in groups:
                for label in [v[0] for v in by[g]["point"]["variants"]]:
                    c = by[g]["aggregates"][label].get(m)
                    if c is None:
                        continue
                    xs.append(f"{g}: {label}")
                    ys.append(100 * c[0])
                    es.append(100 * c[1] if math.isfinite(c[1]) else 0.0)
                    cols.append("#999999" if "fixed" in label else "#55a868" if "pf" in label else "#4c72b0")
            ax.bar(range(len(xs)), ys, yerr=es, capsize=3, color=cols)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xticks(range(len(xs)), xs, rotation=70, ha="right", fontsize=7)
            ax.set_ylabel(name)
        fig.suptitle("Latency vs K = 1 of the same scenario, paired by seed, 95% CI (green: primary-first streaming)",
                     fontsize=10)
        fig.tight_layout()
        made.append(out / "latency_vs_k1.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def check_k1() -> int:
    """K = 1 today against the documented figures: docs/simulation.md 3.4 (holder co-failure, 64 workers
    at 1.4 QPS/worker: 807 interrupted, 771 protected, 193 co-failed for lumen and lumen-no-spec, 206
    for fixed-ckpt) and the 3.2 rerun's per-seed runs.csv (docs/results/sim-goodput-2026-12-07, point
    scale1.4-w64): the same affected TTFT / TPOT and recovery time to the last bit, for lumen-no-spec and
    fixed-ckpt. lumen's per-seed rows there no longer reproduce at d98a1b8 either, before issue 25 (its
    speculation changed after they were produced); its co-failure counts do, and are checked."""
    ref = {}
    path = Path(__file__).resolve().parent.parent / "docs/results/sim-goodput-2026-12-07/runs.csv"
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["point"] == "scale1.4-w64":
                ref[(row["policy"], int(row["seed"]))] = row
    wl_spec = WorkloadSpec(20000, 1.4 * 64)
    plan = FailurePlan((FailureSpec(60.0, frac=0.25),))
    tot: dict[str, list[int]] = {}
    bad = 0
    for seed in range(5):
        wl = wl_spec.build(seed)
        base = simulate(SimConfig(workers=64), wl, "stop-restart", None, seed)
        for pol in ("lumen", "lumen-no-spec", "fixed-ckpt"):
            res = simulate(SimConfig(workers=64), wl, pol, plan, seed)
            st = res.stats
            t = tot.setdefault(pol, [0, 0, 0])
            t[0] += st.interrupted
            t[1] += st.protected_interrupted
            t[2] += st.holder_cofailed
            s = summarize_run(res.records, base.records, policy=pol, seed=seed, failure_times=res.failure_times)
            r = ref[(pol, seed)]
            if pol == "lumen":
                continue
            for m in ("affected_ttft_mean", "affected_tpot_mean", "recovery_time_s"):
                same = repr(float(r[m])) == repr(float(getattr(s, m)))
                bad += not same
                print(f"seed {seed} {pol} {m}: documented {float(r[m])!r} now {getattr(s, m)!r} "
                      f"{'same' if same else 'DIFFERENT'}")
    want = {"lumen": [807, 771, 193], "lumen-no-spec": [807, 771, 193], "fixed-ckpt": [807, 771, 206]}
    for pol, t in tot.items():
        print(f"3.4 {pol}: interrupted, protected, holder also failed = {t} (documented {want[pol]})")
        bad += t != want[pol]
    print("K = 1 reproduces the documented figures bit for bit" if not bad else f"{bad} DIFFERENCES")
    return 1 if bad else 0


def _git_head() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help=f"comma-separated groups of {', '.join(DEFAULT_GROUPS)}")
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--check-k1", action="store_true")
    a = ap.parse_args(argv)
    if a.check_k1:
        return check_k1()
    out = Path(a.out) if a.out else None
    if a.plots_only:
        assert out is not None
        results = [json.loads(p.read_text())["result"] for p in sorted(out.glob("group_*.json"))]
        for p in plots(out, results):
            print(f"wrote {p}")
        return 0
    groups = a.only.split(",") if a.only else list(DEFAULT_GROUPS)
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for p in points():
        if p.name not in groups:
            continue
        meta = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "seeds": a.seeds,
                "nproc": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                "loadavg_start": list(os.getloadavg()), "command": " ".join(sys.argv), "git": _git_head(),
                "policy": POL,
                "workers": WORKERS, "qps_per_worker": QPS_PER_WORKER, "requests": REQUESTS, "t_fail": T_FAIL,
                "plan_mtbf_s": PLAN_MTBF_S, "config": {k: v for k, v in asdict(SimConfig(workers=WORKERS)).items()
                                                       if k != "cost"}}
        r = run_point(p, a.seeds)
        print_point(r)
        if out:
            (out / f"group_{p.name}.json").write_text(json.dumps({"meta": meta, "result": r}, indent=1, default=str))
            write_csv(out / f"runs_{p.name}.csv", [r])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
