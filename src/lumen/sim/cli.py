"""`lumen simulate`: the discrete-event simulator from the command line.

Wired into the `lumen` entry point by `lumen.cli` through `add_parser(subparsers)` and `run(args)`.
Prints the same table and writes the same files and plots as `lumen bench` (via lumen.metrics).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

from lumen.policy import POLICY_NAMES, parse_replicas
from lumen.policy.slots import DEVICE_SHARES
from lumen.units import parse_mtbf

from .config import SPEC_RULES, FailurePlan, FailureSpec, SimConfig, parse_duration, parse_fail
from .cost import DEVICES, MODELS, load_profile
from .experiment import Experiment, WorkloadSpec, run_experiment

SWEEP_KEYS = ("workers", "qps", "qps-per-worker", "alpha", "k", "fail-count", "fail-frac", "ckpt-replicas")
_CHANGE_METRICS = ("affected_ttft_mean", "affected_tpot_mean", "recovery_time_s")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate", help="discrete-event simulation of a lumen cluster (same policy code as serve)",
        description="Simulate a cluster of full-replica workers under failures and compare recovery "
                    "policies. Defaults are the paper's simulation: 10 x Llama-3-70B on 4 A100s, "
                    "Splitwise conversation lengths, 14 QPS, one failure.")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=10)
    g.add_argument("--model", default="llama-3-70b", choices=sorted(MODELS))
    g.add_argument("--draft", default=None, choices=sorted(MODELS), help="draft model (default: paired preset)")
    g.add_argument("--device", default="a100", choices=sorted(DEVICES))
    g.add_argument("--tp", type=int, default=4, help="GPUs per worker (tensor parallel)")
    g.add_argument("--nodes", type=int, default=None, help="spread workers round-robin over this many nodes")
    g.add_argument("--workers-per-device", type=_positive_int, default=1, metavar="N",
                   help="N workers share each device (worker i on device i %% ceil(workers / N), as "
                        "`lumen serve --devices` assigns them)")
    g.add_argument("--device-share", default="auto", choices=DEVICE_SHARES,
                   help="workers of one device: 'shared' (each uses it freely: a dead one's share goes to "
                        "the others), 'slots' (time-division: each steps only in its own slot of a fixed "
                        "cycle, an empty slot stays empty), 'auto' (slots when --workers-per-device > 1)")
    g.add_argument("--slot-ms", type=_positive_float, default=None, metavar="MS",
                   help="slot length under slots (default: 8 decode steps of a batch of 8, "
                        "lumen.policy.slots.default_slot_s)")
    g.add_argument("--profile", default=None, metavar="CSV",
                   help="fitted step-time model from a `lumen profile` CSV instead of the roofline")
    g.add_argument("--kv-tokens", type=int, default=None, help="KV capacity per worker (default: from HBM)")
    g.add_argument("--chunk-tokens", type=int, default=1024)
    g.add_argument("--max-batch", type=int, default=512)
    g.add_argument("--page-tokens", type=int, default=16)
    g.add_argument("--h2d-gbps", type=float, default=26.0, help="host<->device GB/s per GPU")
    g.add_argument("--disk-gbps", type=float, default=2.0, help="SSD read GB/s per worker")
    g.add_argument("--net-gbps", type=float, default=10.0, help="checkpoint streaming Gbit/s per worker")
    g.add_argument("--ckpt-export-interval-ms", type=float, default=100.0,
                   help="decode pages leave at most this often, as in `lumen serve` (0: as soon as full)")
    g.add_argument("--ckpt-budget-gb", type=float, default=160.0)
    g.add_argument("--domains", type=_positive_int, default=None, metavar="N",
                   help="failure domains: workers split into N equal contiguous groups (e.g. 4 nodes of 16); "
                        "checkpoint copies spread over them and --fail t=..:domains=M fails whole ones "
                        "(default: the node of --nodes, else every worker its own)")
    g.add_argument("--domain-blind", action="store_true",
                   help="placement does not see the failure domains (domain failures still happen by them)")
    g.add_argument("--ckpt-replicas", type=_replicas, default=1, metavar="K|auto",
                   help="checkpoint copies per request: 1 (the paper), K >= 2 (K holders in distinct failure "
                        "domains where possible), or 'auto' (policy.choose_replicas per request; docs/replicas.md)")
    g.add_argument("--ckpt-stream-order", default="fifo", choices=("fifo", "primary-first"),
                   help="K > 1: one NIC queue for all copies' pages, or each request's first copy ahead of "
                        "its later copies (these use the bandwidth left)")
    g.add_argument("--ckpt-replicas-max", type=_positive_int, default=3, metavar="K",
                   help="auto: at most this many copies")
    g.add_argument("--ckpt-worker-mtbf", default="1h", metavar="DUR",
                   help="auto: the independent per-worker failures it plans for, MTBF ('none': not planned)")
    g.add_argument("--ckpt-domain-mtbf", default="none", metavar="DUR",
                   help="auto: whole-domain failures it plans for, MTBF per domain ('none': not planned)")
    g.add_argument("--ckpt-price-net", type=float, default=1e-4, metavar="X",
                   help="auto: a copy's price in recompute seconds per NIC second of its stream")
    g.add_argument("--ckpt-price-mem", type=float, default=1e-6, metavar="X",
                   help="auto: ... plus recompute seconds per GB-second of host memory it reserves")
    g.add_argument("--detect-s", type=float, default=0.3)
    g.add_argument("--restart-s", type=float, default=2.0)
    g = p.add_argument_group("recovery")
    g.add_argument("--policy", action="append", choices=POLICY_NAMES,
                   help="repeatable; default: all policies")
    g.add_argument("--alpha", type=float, default=0.6, help="draft acceptance rate")
    g.add_argument("--k", type=int, default=4, help="draft tokens per round")
    g.add_argument("--spec-rule", default="goodput", choices=SPEC_RULES,
                   help="verify positions of an assisted partner: 'goodput' (policy.choose_spec_lengths per "
                        "request each step, pairing by policy.pairing_gain; issue 24) or 'fixed' (K+1 for "
                        "every request, pairing by policy.pick_partner: the rule before)")
    g.add_argument("--draft-cached", action=argparse.BooleanOptionalAction, default=None,
                   help="draft weights kept in host memory (no SSD read before the target's); default: "
                        "resident under --spec-rule goodput, read from the SSD first under fixed. "
                        "--no-draft-cached under goodput: a cold restart, the draft is read first only "
                        "where policy.draft_phase_pays")
    g.add_argument("--pair-interval-s", type=_positive_float, default=1.0, metavar="S",
                   help="goodput rule: pairing re-evaluated this often while a draft waits or assists")
    g.add_argument("--lam", type=float, default=1.0, help="lambda of the placement objective")
    g = p.add_argument_group("workload")
    g.add_argument("--qps", type=float, default=14.0)
    g.add_argument("--qps-per-worker", type=float, default=None, help="overrides --qps: QPS x workers")
    g.add_argument("--requests", type=int, default=15000)
    g.add_argument("--lengths", default="splitwise-conv")
    g.add_argument("--arrival", default="poisson", choices=("poisson", "gamma"))
    g.add_argument("--burstiness", type=float, default=1.0)
    g.add_argument("--trace", default=None, help="CSV/JSONL trace instead of a synthetic workload")
    g = p.add_argument_group("failures")
    g.add_argument("--fail", action="append", default=None, metavar="SPEC",
                   help='repeatable: "t=30s:worker=1", "t=30s:count=4" (simultaneous), "t=30s:frac=0.25", '
                        '"t=30s:domains=1" (whole failure domains, see --domains), "t=30s:domain=0+2"; '
                        't may be a share of the arrival span, "t=30%%". Default: "t=30%%:worker=0"')
    g.add_argument("--mtbf", default=None, help="random failures, per-worker mean time between failures (e.g. 2h)")
    g.add_argument("--no-fail", action="store_true", help="no failures at all")
    g = p.add_argument_group("runs and output")
    g.add_argument("--repeats", type=int, default=5)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--sweep", default=None, metavar="KEY=V1,V2,...",
                   help=f"rerun everything for each value; KEY one of {', '.join(SWEEP_KEYS)}")
    g.add_argument("--out", default=None, help="directory for JSON/CSV/plots")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _replicas(s: str) -> int | str:
    try:
        return parse_replicas(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mtbf(s: str | None) -> float | None:
    return parse_mtbf(s)


def config_from_args(a: argparse.Namespace) -> SimConfig:
    cost = load_profile(a.profile) if a.profile else None
    return SimConfig(workers=a.workers, model=a.model, device=a.device, tp=a.tp, draft=a.draft,
                     alpha=a.alpha, k=a.k, chunk_tokens=a.chunk_tokens, max_batch=a.max_batch,
                     page_tokens=a.page_tokens, h2d_gbps=a.h2d_gbps, disk_gbps=a.disk_gbps,
                     net_gbps=a.net_gbps, ckpt_export_interval_ms=a.ckpt_export_interval_ms, ckpt_budget_gb=a.ckpt_budget_gb, detect_s=a.detect_s,
                     restart_s=a.restart_s, lam=a.lam, draft_cached=a.draft_cached,
                     spec_rule=a.spec_rule, pair_interval_s=a.pair_interval_s,
                     kv_tokens=a.kv_tokens, nodes=a.nodes, cost=cost,
                     workers_per_device=a.workers_per_device, device_share=a.device_share, slot_ms=a.slot_ms,
                     domains=a.domains, domain_aware=not a.domain_blind, ckpt_replicas=a.ckpt_replicas, ckpt_stream_order=a.ckpt_stream_order, ckpt_replicas_max=a.ckpt_replicas_max,
                     ckpt_worker_mtbf_s=_mtbf(a.ckpt_worker_mtbf), ckpt_domain_mtbf_s=_mtbf(a.ckpt_domain_mtbf),
                     ckpt_price_net=a.ckpt_price_net, ckpt_price_mem=a.ckpt_price_mem)


def failures_from_args(a: argparse.Namespace) -> FailurePlan:
    if a.no_fail:
        return FailurePlan()
    specs = tuple(parse_fail(s) for s in (a.fail or ([] if a.mtbf else ["t=30%:worker=0"])))
    return FailurePlan(specs, parse_duration(a.mtbf) if a.mtbf else None)


def workload_from_args(a: argparse.Namespace, workers: int) -> WorkloadSpec:
    qps = a.qps_per_worker * workers if a.qps_per_worker else a.qps
    return WorkloadSpec(a.requests, qps, a.lengths, a.arrival, a.burstiness, trace=a.trace)


def _apply_sweep(a: argparse.Namespace, key: str, value: str) -> argparse.Namespace:
    b = argparse.Namespace(**vars(a))
    if key == "workers":
        b.workers = int(value)
    elif key == "qps":
        b.qps, b.qps_per_worker = float(value), None
    elif key == "qps-per-worker":
        b.qps_per_worker = float(value)
    elif key == "alpha":
        b.alpha = float(value)
    elif key == "k":
        b.k = int(value)
    elif key == "ckpt-replicas":
        b.ckpt_replicas = _replicas(value)
    elif key in ("fail-count", "fail-frac"):
        base = failures_from_args(a).scheduled or (FailureSpec(0.3, count=1, t_frac=True),)
        f = replace(base[0], domains=None, domain_ids=())
        f = (replace(f, workers=(), count=int(value), frac=None) if key == "fail-count"
             else replace(f, workers=(), count=None, frac=float(value)))
        b.fail = [f.to_spec()]
        b.no_fail = False
    return b


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    # a pipe or file gets the full table rather than an 80-column squeeze
    console = Console(width=None if sys.stdout.isatty() else 180)
    policies = args.policy or list(POLICY_NAMES)
    out = Path(args.out) if args.out else None
    if args.sweep:
        key, _, vals = args.sweep.partition("=")
        if key not in SWEEP_KEYS or not vals:
            console.print(f"[red]--sweep must be KEY=V1,V2 with KEY in {', '.join(SWEEP_KEYS)}[/red]")
            return 2
        rows = []
        for v in vals.split(","):
            sub = _apply_sweep(args, key, v.strip())
            exp = _run_one(sub, policies, out / f"{key}={v.strip()}" if out else None, console,
                           title=f"{key}={v.strip()}")
            for pol in policies:
                if pol == "stop-restart":
                    continue
                rows.append({key: v.strip(), "policy": pol,
                             **{f"{m}_change_vs_sr": exp.change(pol, m) for m in _CHANGE_METRICS}})
        _print_sweep(console, key, rows)
        if out:
            _write_rows(out / "sweep.csv", rows)
        return 0
    _run_one(args, policies, out, console)
    return 0


def _run_one(a: argparse.Namespace, policies, out: Path | None, console, title: str | None = None) -> Experiment:
    from lumen.metrics import (
        plot_policy_bars,
        plot_ttft_timeline,
        print_table,
        write_aggregate_csv,
        write_json,
        write_runs_csv,
    )
    from lumen.metrics.report import print_fitted, render_targets_table
    from lumen.metrics.targets import RecoveryTargets, aggregate_targets

    cfg = config_from_args(a)
    wl = workload_from_args(a, cfg.workers)
    fails = failures_from_args(a)
    progress = None if a.quiet else (lambda s: print(s, file=sys.stderr))
    exp = run_experiment(cfg, wl, policies, fails, repeats=a.repeats, seed=a.seed, progress=progress)
    share = ""
    if cfg.workers_per_device > 1:
        share = f" ({cfg.workers_per_device} per device, {cfg.share_mode}" + (
            f", {cfg.slot_s * 1e3:g} ms slots)" if cfg.share_mode == "slots" else ")")
    head = (f"lumen simulate: {cfg.workers} x {cfg.model} on {cfg.tp} x {cfg.device}{share}, "
            f"{wl.qps:g} QPS, {wl.requests} requests ({wl.lengths}), "
            f"failures {_describe(fails)}; mean ± 95% CI over {a.repeats} seeds")
    print_table(exp.aggregates, console=console, title=(f"[{title}] " if title else "") + head)
    _print_sim_stats(console, exp, copies=cfg.ckpt_replicas != 1 or cfg.domains is not None)
    targets = aggregate_targets((s["policy"], RecoveryTargets(**s["targets"])) for s in exp.sim_stats)
    if targets:
        print_fitted(console, render_targets_table(targets))
    if out:
        meta = {"command": " ".join(sys.argv), "config": _cfg_dict(cfg), "workload": asdict(wl),
                "failures": _describe(fails), "policies": list(policies), "repeats": a.repeats,
                "seed": a.seed, "sim_stats": exp.sim_stats}
        write_json(out / "summary.json", exp.summaries, exp.aggregates, meta)
        write_runs_csv(out / "runs.csv", exp.summaries)
        write_aggregate_csv(out / "aggregate.csv", exp.aggregates)
        if not a.no_plots:
            plot_ttft_timeline(exp.summaries, out / "ttft_timeline.png", title=head)
            plot_policy_bars(exp.aggregates, out / "policy_bars.png")
        console.print(f"wrote {out}/summary.json, runs.csv, aggregate.csv"
                      + ("" if a.no_plots else ", ttft_timeline.png, policy_bars.png"))
    return exp


def _cfg_dict(cfg: SimConfig) -> dict:
    d = {k: v for k, v in asdict(cfg).items() if k != "cost"}
    d["cost"] = type(cfg.cost).__name__ if cfg.cost else "RooflineCost"
    d["share_mode"] = cfg.share_mode
    d["draft_resident"] = cfg.draft_resident
    d["slot_s"] = cfg.slot_s if cfg.share_mode == "slots" and cfg.workers_per_device > 1 else None
    if cfg.cost is not None and hasattr(cfg.cost, "coef"):
        d["cost_coef"] = list(cfg.cost.coef)
        d["colocated_slowdown"] = getattr(cfg.cost, "colocated_slowdown", 0.0)
    return json.loads(json.dumps(d, default=str))


def _describe(f: FailurePlan) -> str:
    parts = [s.to_spec() for s in f.scheduled]
    if f.mtbf_s:
        parts.append(f"mtbf={f.mtbf_s:g}s")
    return ", ".join(parts) or "none"


def _print_sim_stats(console, exp: Experiment, copies: bool = False) -> None:
    from rich.table import Table

    t = Table(title="simulator counters (sum over seeds)")
    cols = ("interrupted", "restores", "recomputes", "shed", "protected_interrupted", "holder_cofailed",
            "unprotected",
            "reprotected", "assisted_steps", "verify_positions", "pair_moves", "events", "wall_s")
    if copies:   # K copies / failure domains (issue 25): the copies' own counters
        cols = cols[:7] + ("no_valid_copy", "copies_placed", "copies_lost", "copies_missing", "stream_bytes") + cols[7:]
    t.add_column("policy")
    for c in cols:
        t.add_column(c, justify="right")
    agg: dict[str, dict[str, float]] = {}
    for s in exp.sim_stats:
        d = agg.setdefault(s["policy"], dict.fromkeys(cols, 0.0))
        for c in cols:
            d[c] += s[c]
    for pol, d in agg.items():
        t.add_row(pol, *(f"{d[c]:.2f}" if c == "wall_s" else f"{d[c] / 1e9:.1f} GB" if c == "stream_bytes"
                         else f"{int(d[c])}" for c in cols))
    console.print(t)


def _print_sweep(console, key: str, rows: list[dict]) -> None:
    from rich.table import Table

    t = Table(title="change vs stop-restart (the paper's convention: negative = better), mean over seeds")
    t.add_column(key)
    t.add_column("policy")
    for m in _CHANGE_METRICS:
        t.add_column(m, justify="right")
    for r in rows:
        t.add_row(r[key], r["policy"], *(_pct(r[f"{m}_change_vs_sr"]) for m in _CHANGE_METRICS))
    console.print(t)


def _pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m lumen.sim.cli`), for use before `lumen simulate` is wired."""
    p = argparse.ArgumentParser(prog="lumen simulate")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
