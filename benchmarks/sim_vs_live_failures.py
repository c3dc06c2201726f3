"""The simulator's prediction beside the live failure runs under slots on one H100 (issue 23 item 5).

The prediction was committed before the runs: docs/results/sim-prediction-h100-slots-q2.7-2026-12-07/
(`sim_fidelity_slots_gpu.py --part prediction --prediction-qps 2.7`, 5 seeds, two step-cost models). The live
runs are `lumen bench` at the same fixed 2.7 req/s (`gpu_repro.sh` with QPS=2.7): the bench's results.json
(its summaries, the same `summarize_run` and window as the prediction) and the records in bench-runs.tgz.

For every live failure run this prints the prediction for the same policy and seed beside it, after checking
that the simulated workload is the live one (ids, lengths and arrivals). With `--own-restart` it also
simulates each run again with that run's own measured reload (process up, disk read, host -> device copy,
warm-up of the restarted worker, from the run's end state): what is left of the gap is the simulator's
serving, not the calibrated restart (for lumen, less the draft's own load time, which is not carried over).

    python benchmarks/sim_vs_live_failures.py --live docs/results/gpu-2026-12-07d-slots-q2.7 \
        --out docs/results/gpu-2026-12-07d-slots-q2.7/sim_vs_live.json

Runs without a prediction (another GPU: the H200 runs of 2026-12-07) are simulated with step costs from
their own no-failure runs (`--cost-runs`: the live workers' fits and prefill medians, in-sample for those
runs), each failure run with its own reload, each no-failure run beside its simulation (`--no-failure`):

    python benchmarks/sim_vs_live_failures.py --live docs/results/gpu-2026-12-07e-slots-q2.7-h200 \
        --prediction none --own-restart --no-failure --models live-fit measured-prefill \
        --cost-runs no-failure-seed0 no-failure-seed1 no-failure-seed2 --out <dir>/sim_vs_live.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sim_fidelity_slots_gpu as fid  # noqa: E402  (the prediction's own workload, cost and simulator)
from sim_fidelity_slots_gpu import check_workload  # noqa: E402  (the prediction's own workload check)

PREDICTION = Path("docs/results/sim-prediction-h100-slots-q2.7-2026-12-07/prediction.json")
# (key, label, scale, digits)
FIELDS = (("affected_ttft_mean", "aff. TTFT ms", 1e3, 0), ("affected_tpot_mean", "aff. TPOT ms", 1e3, 1),
          ("outage_ttft_vs_baseline", "outage TTFT x", 1.0, 2), ("kill_to_serving_s", "kill->serving s", 1.0, 1),
          ("n_interrupted", "interrupted", 1.0, 0))
NO_FAILURE_FIELDS = (("ttft_mean", "TTFT ms", 1e3, 1), ("ttft_p99", "TTFT P99 ms", 1e3, 0), ("tpot_mean", "TPOT ms", 1e3, 2))


def live_records(tgz: Path) -> dict[str, list[dict]]:
    """{'<label>-seed<n>': records sorted by id} from the bench's runs archive."""
    out = {}
    with tarfile.open(tgz) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".jsonl") and "/records/" in m.name:
                recs = [json.loads(ln) for ln in io.TextIOWrapper(tf.extractfile(m), "utf-8") if ln.strip()]
                out[Path(m.name).stem] = sorted(recs, key=lambda r: r["req_id"])
    return out


def live_reload_phases(tgz: Path) -> dict[str, dict]:
    """{'<label>-seed<n>': the restarted worker's load phases} from each run's end state (run.json)."""
    out = {}
    with tarfile.open(tgz) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".run.json") and "/records/" in m.name:
                end = json.load(tf.extractfile(m)).get("cluster_end") or {}
                for w in end.get("workers", []):
                    if w.get("id") == fid.FAIL_WORKER and w.get("epoch", 1) > 1:
                        out[Path(m.name).name.removesuffix(".run.json")] = w.get("phases_s", {})
    return out


def own_restart_cfg(kill_to_serving_s: float, phases: dict) -> dict:
    """The simulator's restart settings from one live run's own reload, as `fid.restart_cfg` makes them
    from the calibration run's (`fid.reload_parts`: process up, disk read, host -> device copy and warm-up,
    these two in the worker's own slots; lumen's target read from `target_read_start_s` on). The draft's
    own load is not carried over: the simulator copies a resident draft at host -> device speed (~0.03 s
    here, 5.4 s live on the H100), so its lumen assists from earlier than the live one did."""
    return fid.restart_settings(*fid.reload_parts(kill_to_serving_s, phases))


def simulate_with_own_restart(cost, policy: str, seed: int, qps: float, window: int, restart: dict,
                              gate: str = "ema") -> dict:
    """One failure run of the prediction's measured-prefill / EMA configuration (or another step cost
    and gate), restart as given."""
    cfg = fid.base_cfg(cost, "slots", ckpt_budget_gb=6.0, **restart)
    wl = fid.workload(seed, qps)
    base = fid.Counted(cfg, wl, "stop-restart", None, seed, gate=gate).run()
    s, _, _ = fid.failure_run(cfg, wl, policy, seed, gate, base.records, window)
    return {**{k: s.get(k) for k, *_ in FIELDS}, "recovered": s["recovered"]}


def simulate_no_failure(cost, gate: str, seed: int, qps: float, window: int, live_recs: list[dict] | None = None) -> dict:
    """One no-failure run, summarised as the bench does; with `live_recs`, its arrivals shifted so that
    the simulated slots fall where the live run's did (`fid.slot_phase` of its token times)."""
    slot = fid.SLOT_MS / 1e3
    shift = 0.0 if live_recs is None else (slot - fid.slot_phase(live_recs, slot)) % slot
    res = fid.Counted(fid.base_cfg(cost, "slots"), fid.shifted(fid.workload(seed, qps), shift), "stop-restart",
                      None, seed, gate=gate).run()
    recs = fid.unshift(res.records, shift)
    s = fid.summarize_run(recs, recs, window=window, threshold=fid.THRESHOLD, settle=fid.SETTLE).to_dict()
    return {**{k: s.get(k) for k, *_ in NO_FAILURE_FIELDS}, "shift_s": shift}


def step_costs(models: list[str], pairs, overheads=(0.0,)) -> dict[str, tuple[object, str]]:
    """{'<model>/<gate>': (step cost, gate)} from live runs [(records, end state)], as `fid.cost_models`
    makes live-fit and measured-prefill (with each step overhead in ms: '<model>+<ms>ms/<gate>')."""
    return {f"{name}/{gate}": (cost, gate) for name, cost, gate in fid.cost_models(models, pairs, overheads)}


def fmt(v, scale: float, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * scale:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--live", type=Path, required=True, help="a results directory with results.json and bench-runs.tgz")
    ap.add_argument("--prediction", type=lambda x: None if x.lower() == "none" else Path(x), default=PREDICTION,
                    help="the prediction's prediction.json, or 'none' (runs no prediction was made for)")
    ap.add_argument("--own-restart", action="store_true",
                    help="also simulate each run with its own measured reload instead of the calibrated one")
    ap.add_argument("--no-failure", action="store_true",
                    help="also set each no-failure run beside its simulation (mean / P99 TTFT, TPOT)")
    ap.add_argument("--cost-runs", nargs="+", metavar="RUN",
                    help="take the simulated step costs from these runs of --live (e.g. its no-failure runs: "
                         "in-sample for them) instead of the H100 run the prediction used")
    ap.add_argument("--models", nargs="+", choices=("live-fit", "measured-prefill"), default=["measured-prefill"],
                    help="the step-cost models of the --own-restart and --no-failure simulations (gate: EMA for "
                         "measured-prefill, exact for live-fit, as `fid.cost_models`)")
    ap.add_argument("--step-overhead-ms", type=float, nargs="+", default=[0.0],
                    help="the --models also (or only) with this much more per fitted step (`fid.with_step_overhead`)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.prediction is None and not (a.own_restart or a.no_failure):
        ap.error("--prediction none leaves nothing to compare: add --own-restart or --no-failure")
    pred = json.loads(a.prediction.read_text()) if a.prediction else None
    live = json.loads((a.live / "results.json").read_text())
    recs = live_records(a.live / "bench-runs.tgz")
    phases = live_reload_phases(a.live / "bench-runs.tgz") if a.own_restart else {}
    pairs = (fid.live_runs(a.live / "bench-runs.tgz", a.cost_runs) if a.cost_runs
             else [fid.load_live(fid.LIVE_TGZ)] if a.own_restart or a.no_failure else [])
    costs = step_costs(a.models, pairs, a.step_overhead_ms) if pairs else {}
    qps = live["meta"]["qps"]
    window = live["meta"]["window"]
    if pred and (abs(qps - pred["qps"]) > 1e-9 or window != pred["window"]):
        print(f"the live runs ({qps} req/s, window {live['meta']['window']}) are not the prediction's "
              f"({pred['qps']} req/s, window {pred['window']})", file=sys.stderr)
        return 2
    kill = {(e["policy"], e["seed"]): e for e in live["meta"]["fault_events"]}
    rows, nf_rows = [], []
    for run in live["runs"]:
        pol, seed = run["policy"], run["seed"]
        if a.no_failure and (pol, seed) not in kill and not run.get("failure_times"):
            nf_rows.append(no_failure_row(a, run, recs[f"{pol}-seed{seed}"], qps, window, costs))
            continue
        if (pol, seed) not in kill or (pred and seed not in pred["seeds"]):
            continue
        key = f"{pol}-seed{seed}"
        identical = check_workload(recs[key], seed, qps)["identical"]
        e = kill[(pol, seed)]
        out_end = run.get("outage_end_s")
        live_row = {**{k: run.get(k) for k, *_ in FIELDS}, "recovered": run["recovered"],
                    "kill_to_serving_s": None if out_end is None else out_end - e["injected_s"]}
        row = {"policy": pol, "seed": seed, "workload_identical": identical, "live": live_row, "predicted": {}}
        for c in pred["configs"] if pred else ():
            p = c["runs"][pol][seed]
            row["predicted"][f"{c['cost']}/{c['gate']}"] = {**{k: p.get(k) for k, *_ in FIELDS}, "recovered": p["recovered"]}
        if (a.own_restart and live_row["kill_to_serving_s"] is not None
                and {"disk_to_host_s", "weights_to_device_s"} <= set(phases.get(key, {}))):
            restart = own_restart_cfg(live_row["kill_to_serving_s"], phases[key])
            row["own_restart"] = restart
            for label, (cost, gate) in costs.items():
                row["predicted"][f"{label}, own restart"] = simulate_with_own_restart(
                    cost, pol, seed, qps, window, restart, gate)
        rows.append(row)
    if not rows:
        print("no live failure run matches a predicted policy and seed", file=sys.stderr)
        return 2
    wsrc = max([36] + [len(k) for r in rows for k in r["predicted"]])
    head = f"{'run':22s} {'source':{wsrc}s} " + " ".join(f"{lab:>15s}" for _, lab, *_ in FIELDS) + "  recovered"
    if pred:
        print(f"prediction {a.prediction} (made before the runs) against live {a.live}, {qps:g} req/s")
    else:
        print(f"no prediction: live {a.live}, {qps:g} req/s, simulated with the step costs of "
              f"{a.cost_runs or fid.LIVE_PREFIX} (in-sample for those runs)")
    print(head)
    for r in rows:
        name = f"{r['policy']}-seed{r['seed']}" + ("" if r["workload_identical"] else " (workload differs!)")
        for src, v in (("live", r["live"]), *r["predicted"].items()):
            print(f"{name:22s} {src:{wsrc}s} " + " ".join(f"{fmt(v[k], sc, d):>15s}" for k, _, sc, d in FIELDS)
                  + f"  {'yes' if v['recovered'] else 'no (censored)'}")
            name = ""
    if nf_rows:
        print("\nno-failure runs (sim gaps against live in brackets)")
        wnf = max(len(k) for r in nf_rows for k in r["simulated"])
        print(f"{'run':22s} {'source':{wnf}s} " + " ".join(f"{lab:>15s}" for _, lab, *_ in NO_FAILURE_FIELDS))
        for r in nf_rows:
            name = f"no-failure-seed{r['seed']}" + ("" if r["workload_identical"] else " (workload differs!)")
            for src, v in (("live", r["live"]), *r["simulated"].items()):
                cells = [fmt(v[k], sc, d) + ("" if src == "live" or not r["live"].get(k) or v[k] is None else
                                             f" ({(v[k] - r['live'][k]) / r['live'][k]:+.0%})") for k, _, sc, d in NO_FAILURE_FIELDS]
                print(f"{name:22s} {src:{wnf}s} " + " ".join(f"{c:>15s}" for c in cells))
                name = ""
    if a.out:
        doc = {"prediction": str(a.prediction), "live": str(a.live), "qps": qps, "rows": rows}
        if a.cost_runs or a.no_failure or a.models != ["measured-prefill"] or a.step_overhead_ms != [0.0]:
            doc.update(cost_runs=a.cost_runs, models=a.models, step_overhead_ms=a.step_overhead_ms, no_failure_rows=nf_rows)
        a.out.write_text(json.dumps(doc, indent=1, default=lambda x: None))
    return 0 if all(r["workload_identical"] for r in rows + nf_rows) else 1


def no_failure_row(a, run: dict, live_recs: list[dict], qps: float, window: int, costs: dict) -> dict:
    """A no-failure run beside its simulation under each step cost: as simulated (slot 0 at t = 0), with
    the slots aligned to the live ones, and (a run among several --cost-runs) with the cost of the others."""
    seed = run["seed"]
    row = {"policy": run["policy"], "seed": seed, "workload_identical": check_workload(live_recs, seed, qps)["identical"],
           "live": {k: run.get(k) for k, *_ in NO_FAILURE_FIELDS}, "simulated": {}}
    name = f"{run['policy']}-seed{seed}"
    others = [n for n in a.cost_runs or () if n != name]
    loo = (step_costs(a.models, fid.live_runs(a.live / "bench-runs.tgz", others), a.step_overhead_ms)
           if others and name in a.cost_runs else {})
    for label, (cost, gate) in costs.items():
        row["simulated"][label] = simulate_no_failure(cost, gate, seed, qps, window)
        row["simulated"][f"{label}, slots aligned"] = simulate_no_failure(cost, gate, seed, qps, window, live_recs)
        if label in loo:
            row["simulated"][f"{label}, other runs' cost"] = simulate_no_failure(loo[label][0], gate, seed, qps, window)
    return row


if __name__ == "__main__":
    sys.exit(main())
