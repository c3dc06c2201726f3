"""Issue 24 in the simulator: mechanism 3 under the goodput rule against the fixed rule, lumen-no-spec,
fixed-ckpt and stop-restart, at the configurations of docs/simulation.md sections 3.1 and 3.2, plus a
finer load sweep (10 workers, 6..34 QPS).

Every point runs what `lumen simulate` runs for it (`run_experiment`'s loop: per seed the seeded
workload, the no-failure stop-restart reference, then each policy with the same failures, each
summarised by `lumen.metrics.summarize_run`), with "lumen-fixed" = `lumen` under `--spec-rule fixed`.
The equivalent commands (one per rule; the fixed rule's `lumen` is the old figure):

    lumen simulate --repeats 5 [--qps 30] --policy lumen --policy lumen-no-spec --policy fixed-ckpt \
        --policy stop-restart                                      # 3.1 (15,000 requests, worker 0 at 30%)
    lumen simulate --repeats 5 [--qps 30] --spec-rule fixed --policy lumen
    lumen simulate --repeats 5 --requests 20000 --qps-per-worker 1.4 --fail t=60s:frac=0.25 \
        --sweep workers=4,8,16,32,64 --policy ... [--spec-rule fixed]   # 3.2 (64 workers at 2.6: 40,000)

Besides the paper's metrics (affected TTFT/TPOT, recovery time) each run gets a fixed-window figure:
mean TTFT and TPOT of the requests arriving in the first WINDOW_S seconds after the failure (the same
requests for every policy, so it does not move with the affected period's ends), and the simulator's
counters (K histogram, assisted iterations, verify positions, pair moves).

    python benchmarks/sim_goodput.py --out docs/results/sim-goodput-2026-12-07           # everything
    python benchmarks/sim_goodput.py --only q14,q30 --out /tmp/x                         # some points
    python benchmarks/sim_goodput.py --plots-only --out docs/results/sim-goodput-2026-12-07
    python benchmarks/sim_goodput.py --only cold,interval --name extras --out docs/results/sim-goodput-2026-12-07
    python benchmarks/sim_goodput.py --compare docs/results/sim-goodput-2026-12-07 \
        --out docs/results/sim-goodput-2026-12-07/dwell      # lumen (goodput) here against an earlier run

    python benchmarks/sim_goodput.py --diagnose-pairing --out docs/results/sim-goodput-2026-12-07/dwell

`--diagnose-pairing` runs `lumen` alone (10 workers, 3.1's failure, 6, 14 and 30 QPS, the seeds) and
observes every pairing review of an assisting worker (`lumen.policy.pick_partner_by_gain`, wrapped, its
answers unchanged): the moves, how long the pair had lasted and the current partner's gain at each, and
the reviews where the minimum dwell kept a pair that the rule without it would have moved. It writes
`pairing_diagnosis.json`.

`--compare OLD` runs nothing: it reads `results.json` (and `extras.json` where both have it) in OLD and
in --out and writes `compare.md` and `compare.csv` to --out: per point lumen (goodput)'s recovery,
affected TTFT/TPOT (mean ± 95% CI) before and after, its affected TTFT and TPOT against lumen-no-spec's
(the targets of docs/simulation.md 3.6), pair moves, assisted iterations and verify positions per run,
and whether every other policy's runs are unchanged.

Extras (not run by default): "cold" = the draft not resident (`draft_cached=False`: read from the SSD
first only where `policy.draft_phase_pays`), "interval" = the pairing re-evaluation period (1 s, 5 s,
pair once and never re-evaluate).
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

from lumen.metrics import NO_FAILURE, aggregate, summarize_run
from lumen.metrics.records import mean, tpot, ttft
from lumen.sim import FailurePlan, FailureSpec, SimConfig, WorkloadSpec, simulate

WINDOW_S = 120.0
SEEDS = 5
# (label, policy, SimConfig overrides)
VARIANTS = (("lumen", "lumen", {}), ("lumen-fixed", "lumen", {"spec_rule": "fixed"}),
            ("lumen-no-spec", "lumen-no-spec", {}), ("fixed-ckpt", "fixed-ckpt", {}), ("stop-restart", "stop-restart", {}))
# extras: a cold draft (node reboot: policy.draft_phase_pays decides), and the pairing re-evaluation period
COLD_VARIANTS = (("lumen", "lumen", {}), ("lumen-cold", "lumen", {"draft_cached": False}),
                 ("lumen-no-spec", "lumen-no-spec", {}), ("stop-restart", "stop-restart", {}))
INTERVAL_VARIANTS = (("lumen", "lumen", {}), ("lumen-pair5s", "lumen", {"pair_interval_s": 5.0}),
                     ("lumen-pair-once", "lumen", {"pair_interval_s": 1e9}), ("lumen-no-spec", "lumen-no-spec", {}),
                     ("stop-restart", "stop-restart", {}))
SWEEP_VARIANTS = tuple(v for v in VARIANTS if v[0] != "fixed-ckpt")
SWEEP_QPS = tuple(range(6, 35, 2))
ONE_AT_30 = FailurePlan((FailureSpec(0.3, workers=(0,), t_frac=True),))
QUARTER_AT_60 = FailurePlan((FailureSpec(60.0, frac=0.25),))
REPORTED = ("recovery_time_s", "affected_ttft_mean", "affected_tpot_mean", "ttft_mean", "tpot_mean")
STATS = ("assisted_steps", "spec_idle_steps", "verify_positions", "pair_moves", "draft_skipped", "iterations",
         "events", "wall_s")


@dataclass(frozen=True)
class Point:
    name: str
    group: str            # "3.1", "3.2", "sweep"
    workers: int
    qps: float
    requests: int
    plan: FailurePlan
    variants: tuple = VARIANTS
    x: float = 0.0        # the swept value


def points() -> list[Point]:
    out = [Point("q14", "3.1", 10, 14.0, 15000, ONE_AT_30, x=14.0),
           Point("q30", "3.1", 10, 30.0, 15000, ONE_AT_30, x=30.0)]
    for qpw in (1.4, 2.6):
        for n in (4, 8, 16, 32, 64):
            req = 40000 if (qpw == 2.6 and n == 64) else 20000
            out.append(Point(f"scale{qpw}-w{n}", "3.2", n, qpw * n, req, QUARTER_AT_60, x=n))
    for q in SWEEP_QPS:
        out.append(Point(f"load-q{q}", "sweep", 10, float(q), 15000, ONE_AT_30, SWEEP_VARIANTS, x=float(q)))
    for q in (14.0, 30.0):
        out.append(Point(f"cold-q{q:g}", "cold", 10, q, 15000, ONE_AT_30, COLD_VARIANTS, x=q))
        out.append(Point(f"interval-q{q:g}", "interval", 10, q, 15000, ONE_AT_30, INTERVAL_VARIANTS, x=q))
    out.append(Point("cold-scale2.6-w16", "cold", 16, 2.6 * 16, 20000, QUARTER_AT_60, COLD_VARIANTS, x=16))
    return out


DEFAULT_GROUPS = ("3.1", "3.2", "sweep")


def window_metrics(records, t_fail: float) -> tuple[float, float]:
    rs = [r for r in records if t_fail <= r.arrival < t_fail + WINDOW_S and r.error is None]
    return mean(map(ttft, rs)), mean(map(tpot, rs))


def run_point(p: Point, seeds: int) -> dict:
    cfg = SimConfig(workers=p.workers)
    wl_spec = WorkloadSpec(p.requests, p.qps)
    summaries, runs = [], []
    t0 = time.perf_counter()
    for seed in range(seeds):
        wl = wl_spec.build(seed)
        base = simulate(cfg, wl, "stop-restart", None, seed)
        summaries.append(summarize_run(base.records, base.records, policy=NO_FAILURE, seed=seed))
        for label, policy, over in p.variants:
            c = cfg.with_(**over)
            res = simulate(c, wl, policy, p.plan, seed)
            s = replace(summarize_run(res.records, base.records, policy=policy, seed=seed,
                                      failure_times=res.failure_times), policy=label)
            summaries.append(s)
            wt, wp = window_metrics(res.records, res.failure_times[0])
            bt, bp = window_metrics(base.records, res.failure_times[0])
            st = asdict(res.stats)
            runs.append({"point": p.name, "group": p.group, "x": p.x, "workers": p.workers, "qps": p.qps,
                         "requests": p.requests, "policy": label, "seed": seed,
                         **{m: getattr(s, m) for m in REPORTED}, "recovered": s.recovered,
                         "window_ttft_mean": wt, "window_tpot_mean": wp,
                         "baseline_window_ttft_mean": bt, "baseline_window_tpot_mean": bp,
                         **{k: st[k] for k in STATS}, "spec_k_hist": st["spec_k_hist"],
                         "policy_calls": st["policy_calls"]})
    wall = time.perf_counter() - t0
    aggs = aggregate(summaries)
    agg = {a.policy: {"recovered": a.recovered, "repeats": a.repeats,
                      **{m: [a.metrics[m].mean, a.metrics[m].half_width] for m in REPORTED}} for a in aggs}
    for label, _, _ in p.variants:   # the window figures: mean and 95% CI over seeds too
        from lumen.metrics import ci95
        for m in ("window_ttft_mean", "window_tpot_mean"):
            agg[label][m] = list(ci95([r[m] for r in runs if r["policy"] == label]))
    return {"point": asdict(p) | {"plan": [f.to_spec() for f in p.plan.scheduled]}, "wall_s": wall,
            "aggregates": agg, "runs": runs}


def _fmt(ci, scale=1.0, digits=2) -> str:
    m, h = ci
    if not math.isfinite(m):
        return "-"
    return f"{m * scale:.{digits}f} ± {h * scale:.{digits}f}" if math.isfinite(h) else f"{m * scale:.{digits}f}"


def _pct(a, b) -> str:
    return f"{100 * (a - b) / b:+.1f}%" if math.isfinite(a) and math.isfinite(b) and b else "-"


def print_point(r: dict) -> None:
    p, agg = r["point"], r["aggregates"]
    print(f"\n## {p['name']}: {p['workers']} workers, {p['qps']:g} QPS, {p['requests']} requests, "
          f"{', '.join(p['plan'])}; {r['wall_s']:.1f} s")
    sr = agg["stop-restart"]
    print("| policy | recovery (s) | affected TTFT (s) | affected TPOT (ms) | window TTFT (s) | window TPOT (ms) "
          "| TTFT vs SR | TPOT vs SR | recovery vs SR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in [v[0] for v in p["variants"]]:
        a = agg[label]
        print(f"| {label} | {_fmt(a['recovery_time_s'], 1, 1)} | {_fmt(a['affected_ttft_mean'])} "
              f"| {_fmt(a['affected_tpot_mean'], 1e3, 1)} | {_fmt(a['window_ttft_mean'])} "
              f"| {_fmt(a['window_tpot_mean'], 1e3, 1)} "
              f"| {_pct(a['affected_ttft_mean'][0], sr['affected_ttft_mean'][0])} "
              f"| {_pct(a['affected_tpot_mean'][0], sr['affected_tpot_mean'][0])} "
              f"| {_pct(a['recovery_time_s'][0], sr['recovery_time_s'][0])} |")
    sys.stdout.flush()


def write_csv(path: Path, results: list[dict]) -> None:
    rows = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in run.items()}
            for r in results for run in r["runs"]]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    agg_rows = []
    for r in results:
        p = r["point"]
        for label, a in r["aggregates"].items():
            row = {"point": p["name"], "group": p["group"], "x": p["x"], "workers": p["workers"], "qps": p["qps"],
                   "policy": label, "recovered": a["recovered"], "repeats": a["repeats"]}
            for m in (*REPORTED, "window_ttft_mean", "window_tpot_mean"):
                if m in a:
                    row[m], row[m + "_ci95"] = a[m]
            agg_rows.append(row)
    fields = list(dict.fromkeys(k for row in agg_rows for k in row))
    with path.with_name(path.name.replace("runs", "aggregate")).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(agg_rows)


def plots(out: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    sweep = sorted((r for r in results if r["point"]["group"] == "sweep"), key=lambda r: r["point"]["x"])
    if not sweep:
        return
    qps = np.array([r["point"]["x"] for r in sweep])

    def runs_of(r, label):
        return [x for x in r["runs"] if x["policy"] == label]

    # 1. chosen-K distribution against load (goodput rule): share of request-iterations of an assisted
    # partner at each K, summed over seeds
    kmax = 1 + max(len(x["spec_k_hist"]) for r in sweep for x in runs_of(r, "lumen"))
    shares = np.zeros((len(sweep), kmax))
    for i, r in enumerate(sweep):
        for x in runs_of(r, "lumen"):
            h = x["spec_k_hist"]
            shares[i, :len(h)] += h
    tot = shares.sum(axis=1, keepdims=True)
    shares = np.divide(shares, tot, out=np.zeros_like(shares), where=tot > 0)
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(len(sweep))
    cmap = plt.get_cmap("viridis")
    for k in range(kmax - 1):
        ax.bar(qps, shares[:, k], bottom=bottom, width=1.6, color=cmap(k / max(1, kmax - 2)), label=f"K = {k}")
        bottom += shares[:, k]
    for i in range(len(sweep)):
        ax.text(qps[i], 1.01, f"{int(tot[i, 0] / 1e3)}k", ha="center", fontsize=7)
    ax.set_xlabel("load (QPS, 10 workers; saturation ~37)")
    ax.set_ylabel("share of the partner's request-iterations")
    ax.set_ylim(0, 1.08)
    ax.set_title("goodput rule: K chosen per mirrored request (label: request-iterations, 5 seeds)", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "k_distribution_vs_load.png", dpi=120)
    plt.close(fig)

    # 2. assisted iterations and verify positions against load, goodput and fixed rules (mean per run)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, style in (("lumen", "o-"), ("lumen-fixed", "s--")):
        a = np.array([np.mean([x["assisted_steps"] for x in runs_of(r, label)]) for r in sweep])
        v = np.array([np.mean([x["verify_positions"] for x in runs_of(r, label)]) for r in sweep])
        name = "goodput" if label == "lumen" else "fixed"
        a1.plot(qps, a, style, label=name)
        a2.plot(qps, v / 1e3, style, label=name)
    idle = np.array([np.mean([x["spec_idle_steps"] for x in runs_of(r, "lumen")]) for r in sweep])
    a1.plot(qps, idle, "^:", label="goodput: paired, K = 0 for all")
    a1.set_xlabel("load (QPS, 10 workers)")
    a1.set_ylabel("partner iterations per run")
    a1.set_title("assisted iterations (at least one K > 0)", fontsize=9)
    a1.legend(fontsize=8)
    a2.set_xlabel("load (QPS, 10 workers)")
    a2.set_ylabel("thousand draft tokens verified per run")
    a2.set_title("verify positions", fontsize=9)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "assisted_steps_vs_load.png", dpi=120)
    plt.close(fig)

    # 3. affected TTFT against load, mean and 95% CI over seeds
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, style in (("lumen", "o-"), ("lumen-fixed", "s--"), ("lumen-no-spec", "^-"), ("stop-restart", "x:")):
        for ax, m in ((a1, "affected_ttft_mean"), (a2, "window_ttft_mean")):
            ys = np.array([r["aggregates"][label][m] for r in sweep], dtype=float)
            name = {"lumen": "lumen (goodput)", "lumen-fixed": "lumen (fixed rule)"}.get(label, label)
            ax.errorbar(qps + {"lumen": -0.3, "lumen-fixed": -0.1, "lumen-no-spec": 0.1}.get(label, 0.3),
                        ys[:, 0], yerr=np.nan_to_num(ys[:, 1]), fmt=style, capsize=2, label=name, ms=4)
    for ax, t in ((a1, "failure-affected mean TTFT (paper's period)"),
                  (a2, f"mean TTFT, arrivals in the {WINDOW_S:g} s after the failure")):
        ax.set_xlabel("load (QPS, 10 workers)")
        ax.set_ylabel("s")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "affected_ttft_vs_load.png", dpi=120)
    plt.close(fig)


def diagnose_pairing(out: Path, seeds: int, qps_list=(6.0, 14.0, 30.0)) -> dict:
    """See the module docstring (`--diagnose-pairing`)."""
    from lumen import policy as P

    orig = P.pick_partner_by_gain
    log: dict = {}

    def observed(view, wid, gains, current=None, paired_for_s=math.inf):
        p = orig(view, wid, gains, current=current, paired_for_s=paired_for_s)
        if current is not None:
            log["reviews"] += 1
            if p is not None and p != current:
                log["moves"].append({"paired_for_s": paired_for_s, "gain_current": gains.get(current, 0.0),
                                     "gain_new": gains[p]})
            elif orig(view, wid, gains, current=current) != p:     # the same review without the dwell
                best = max((g for k, g in gains.items() if k != current), default=0.0)
                log["held"] += 1
                log["held_current_gain_0"] += gains.get(current, 0.0) <= 0.0 < best
        return p

    res = {}
    P.pick_partner_by_gain = observed
    try:
        for q in qps_list:
            log.update(reviews=0, moves=[], held=0, held_current_gain_0=0)
            for seed in range(seeds):
                simulate(SimConfig(workers=10), WorkloadSpec(15000, q).build(seed), "lumen", ONE_AT_30, seed)
            mv = log["moves"]
            dw = sorted(m["paired_for_s"] for m in mv)
            res[f"{q:g}"] = {"seeds": seeds, "reviews": log["reviews"], "moves": len(mv),
                             "moves_current_gain_0": sum(m["gain_current"] <= 0.0 for m in mv),
                             "paired_for_s_min_median_max": [dw[0], dw[len(dw) // 2], dw[-1]] if dw else [],
                             "held_by_dwell": log["held"], "held_current_gain_0": log["held_current_gain_0"],
                             "move_list": mv}
            r = res[f"{q:g}"]
            print(f"{q:g} QPS, {seeds} seeds: {r['reviews']} reviews of an assisting worker; {r['moves']} moves "
                  f"({r['moves_current_gain_0']} with the current partner's gain 0; paired for min/median/max "
                  f"{'/'.join(f'{x:.1f}' for x in r['paired_for_s_min_median_max'])} s); the dwell kept "
                  f"{r['held_by_dwell']} pairs the rule without it would have moved ({r['held_current_gain_0']} "
                  f"with the current partner's gain 0 and another's positive)")
    finally:
        P.pick_partner_by_gain = orig
    (out / "pairing_diagnosis.json").write_text(json.dumps(res, indent=1))
    return res


COMPARED = ("recovery_time_s", "affected_ttft_mean", "affected_tpot_mean", "window_ttft_mean", "window_tpot_mean")
PER_RUN = ("pair_moves", "assisted_steps", "spec_idle_steps", "verify_positions")


def _overlap(a, b) -> bool:
    """Whether two (mean, 95% half-width) intervals overlap."""
    return abs(a[0] - b[0]) <= (a[1] if math.isfinite(a[1]) else 0.0) + (b[1] if math.isfinite(b[1]) else 0.0)


def _run_key(x: dict) -> tuple:
    return tuple(x[m] for m in (*REPORTED, "window_ttft_mean", "window_tpot_mean"))


def compare(old_dir: Path, new_dir: Path, label: str = "lumen", ref: str = "lumen-no-spec") -> None:
    """lumen (goodput) in `new_dir`'s results against `old_dir`'s, point by point (see the docstring)."""
    from lumen.metrics import ci95
    rows, unchanged, md = [], [], []
    for stem in ("results", "extras"):
        fo, fn = old_dir / f"{stem}.json", new_dir / f"{stem}.json"
        if not (fo.exists() and fn.exists()):
            continue
        old = {r["point"]["name"]: r for r in json.loads(fo.read_text())["results"]}
        for rn in json.loads(fn.read_text())["results"]:
            name = rn["point"]["name"]
            ro = old.get(name)
            if ro is None:
                continue
            for v in rn["point"]["variants"]:
                lab = v[0]
                runs_o = [x for x in ro["runs"] if x["policy"] == lab]
                runs_n = [x for x in rn["runs"] if x["policy"] == lab]
                if not runs_o:
                    continue
                row = {"file": stem, "point": name, "group": rn["point"]["group"], "x": rn["point"]["x"],
                       "policy": lab}
                for m in COMPARED:
                    row[m + "_old"], row[m + "_old_ci95"] = ro["aggregates"][lab][m]
                    row[m + "_new"], row[m + "_new_ci95"] = rn["aggregates"][lab][m]
                for m in PER_RUN:
                    row[m + "_old"] = sum(x[m] for x in runs_o) / len(runs_o)
                    row[m + "_new"] = sum(x[m] for x in runs_n) / len(runs_n)
                row["runs_identical"] = [_run_key(x) for x in runs_o] == [_run_key(x) for x in runs_n]
                # paired by seed (the same workload and failures): per-seed relative change, mean and 95% CI
                by_seed = {x["seed"]: x for x in runs_o}
                for m in COMPARED[1:]:
                    d = [(y[m] - by_seed[y["seed"]][m]) / by_seed[y["seed"]][m] for y in runs_n
                         if y["seed"] in by_seed and by_seed[y["seed"]][m]]
                    row[m + "_paired_change"], row[m + "_paired_change_ci95"] = ci95(d) if d else (math.nan, math.nan)
                if ref in rn["aggregates"]:
                    a, b = rn["aggregates"][lab], rn["aggregates"][ref]
                    row["ttft_vs_ref_new"] = (a["affected_ttft_mean"][0] - b["affected_ttft_mean"][0]) / b["affected_ttft_mean"][0]
                    row["tpot_vs_ref_new"] = (a["affected_tpot_mean"][0] - b["affected_tpot_mean"][0]) / b["affected_tpot_mean"][0]
                    row["ttft_ci_overlap_ref_new"] = _overlap(a["affected_ttft_mean"], b["affected_ttft_mean"])
                rows.append(row)
                if lab != label:
                    unchanged.append((stem, name, lab, row["runs_identical"]))
    with (new_dir / "compare.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)

    def ci(r, m, scale=1.0, digits=2, which="new"):
        return _fmt((r[f"{m}_{which}"], r[f"{m}_{which}_ci95"]), scale, digits)

    md.append(f"# {label} (goodput): {new_dir} against {old_dir}\n")
    md.append("Mean ± 95% CI over seeds; per-run counters are means over seeds. 'vs no-spec': this run's "
              f"{label} against this run's {ref} (affected means; 'overlap': their 95% CIs overlap). 'paired "
              "change': new against old seed by seed (the same workload and failures), mean ± 95% CI of the "
              "relative change; * where the CI excludes 0.\n")
    md.append("| file | point | recovery (s) old → new | affected TTFT (s) old → new | affected TPOT (ms) old → new "
              "| window TPOT (ms) old → new | TTFT vs no-spec (new) | overlap | TPOT vs no-spec (new) "
              "| pair moves / run | assisted iterations / run | idle paired iterations / run | verify positions / run "
              "| paired change: affected TTFT / affected TPOT / window TPOT |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def pch(r, m):
        mm, h = r[m + "_paired_change"], r[m + "_paired_change_ci95"]
        return f"{100 * mm:+.1f} ± {100 * h:.1f}%" + ("*" if abs(mm) > h else "")
    for r in rows:
        if r["policy"] != label:
            continue
        md.append(f"| {r['file']} | {r['point']} | {ci(r, 'recovery_time_s', 1, 1, 'old')} → {ci(r, 'recovery_time_s', 1, 1)} "
                  f"| {ci(r, 'affected_ttft_mean', which='old')} → {ci(r, 'affected_ttft_mean')} "
                  f"| {ci(r, 'affected_tpot_mean', 1e3, 1, 'old')} → {ci(r, 'affected_tpot_mean', 1e3, 1)} "
                  f"| {ci(r, 'window_tpot_mean', 1e3, 1, 'old')} → {ci(r, 'window_tpot_mean', 1e3, 1)} "
                  f"| {100 * r.get('ttft_vs_ref_new', math.nan):+.1f}% | {'yes' if r.get('ttft_ci_overlap_ref_new') else 'NO'} "
                  f"| {100 * r.get('tpot_vs_ref_new', math.nan):+.1f}% "
                  f"| {r['pair_moves_old']:.1f} → {r['pair_moves_new']:.1f} "
                  f"| {r['assisted_steps_old']:.0f} → {r['assisted_steps_new']:.0f} "
                  f"| {r['spec_idle_steps_old']:.0f} → {r['spec_idle_steps_new']:.0f} "
                  f"| {r['verify_positions_old'] / 1e3:.1f}k → {r['verify_positions_new'] / 1e3:.1f}k "
                  f"| {pch(r, 'affected_ttft_mean')} / {pch(r, 'affected_tpot_mean')} / {pch(r, 'window_tpot_mean')} |")
    changed = [u for u in unchanged if not u[3]]
    md.append(f"\nOther policies' runs (recovery, affected/overall/window TTFT and TPOT per seed) identical in "
              f"{len(unchanged) - len(changed)} of {len(unchanged)} (point, policy) pairs"
              + ("." if not changed else "; changed: " + ", ".join(f"{s}/{n}/{p}" for s, n, p, _ in changed) + "."))
    (new_dir / "compare.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=SEEDS)
    ap.add_argument("--only", default=None,
                    help="comma-separated point names or groups (3.1, 3.2, sweep; extras: cold, interval); "
                         "default: 3.1, 3.2 and sweep")
    ap.add_argument("--name", default="results", help="results file stem (default results: results.json)")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--diagnose-pairing", action="store_true",
                    help="observe lumen's pairing reviews at 6, 14, 30 QPS (writes pairing_diagnosis.json)")
    ap.add_argument("--compare", default=None, metavar="OLD",
                    help="write compare.md/.csv in --out: lumen (goodput) of --out's results against OLD's")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.name}.json"
    if a.diagnose_pairing:
        diagnose_pairing(out, a.seeds)
        return 0
    if a.compare:
        compare(Path(a.compare), out)
        return 0
    if a.plots_only:
        plots(out, json.loads(path.read_text())["results"])
        return 0
    want = set(a.only.split(",")) if a.only else set(DEFAULT_GROUPS)
    todo = [p for p in points() if p.name in want or p.group in want]
    results = []
    start = time.time()
    meta = {"started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)), "seeds": a.seeds,
            "window_s": WINDOW_S, "nproc": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "loadavg_start": os.getloadavg(), "command": " ".join(sys.argv),
            "config": {k: v for k, v in asdict(SimConfig()).items() if k != "cost"}}
    for p in todo:
        r = run_point(p, a.seeds)
        results.append(r)
        print_point(r)
        meta["wall_s"] = time.time() - start
        meta["loadavg_end"] = os.getloadavg()
        path.write_text(json.dumps({"meta": meta, "results": results}, default=str))
    meta["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    path.write_text(json.dumps({"meta": meta, "results": results}, default=str))
    write_csv(out / ("runs.csv" if a.name == "results" else f"{a.name}_runs.csv"), results)
    if a.name == "results":
        plots(out, results)
    stem = "" if a.name == "results" else f"{a.name}_"
    print(f"\n{len(todo)} points in {meta['wall_s']:.0f} s; wrote {path}, {stem}runs.csv, {stem}aggregate.csv"
          + (", plots" if a.name == "results" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
