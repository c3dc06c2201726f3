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
    from the calibration run's: the process comes up (what kill -> SERVING leaves after the load phases),
    then the disk read, the host -> device copy and the warm-up (these two in the worker's own slots).
    Lumen's `disk_to_host_s` counts from the start of its draft phase: the target's read is what follows
    `target_read_start_s` (0 with a resident draft). The draft's own load is not carried over: the simulator
    copies a resident draft at host -> device speed (~0.03 s here, 5.4 s live on the H100), so its lumen
    assists from earlier than the live one did."""
    disk = phases["disk_to_host_s"] - phases.get("target_read_start_s", 0.0)
    h2d = phases["weights_to_device_s"]
    warm = phases.get("engine_init_s", 0.0) + phases.get("warmup_s", 0.0)
    return fid.restart_settings(kill_to_serving_s - disk - h2d - warm, disk, h2d, warm)


def simulate_with_own_restart(cost, policy: str, seed: int, qps: float, window: int, restart: dict) -> dict:
    """One failure run of the prediction's measured-prefill / EMA configuration, restart as given."""
    cfg = fid.base_cfg(cost, "slots", ckpt_budget_gb=6.0, **restart)
    wl = fid.workload(seed, qps)
    base = fid.Counted(cfg, wl, "stop-restart", None, seed, gate="ema").run()
    s, _, _ = fid.failure_run(cfg, wl, policy, seed, "ema", base.records, window)
    return {**{k: s.get(k) for k, *_ in FIELDS}, "recovered": s["recovered"]}


def fmt(v, scale: float, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * scale:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--live", type=Path, required=True, help="a results directory with results.json and bench-runs.tgz")
    ap.add_argument("--prediction", type=Path, default=PREDICTION)
    ap.add_argument("--own-restart", action="store_true",
                    help="also simulate each run with its own measured reload instead of the calibrated one")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    pred = json.loads(a.prediction.read_text())
    live = json.loads((a.live / "results.json").read_text())
    recs = live_records(a.live / "bench-runs.tgz")
    phases = live_reload_phases(a.live / "bench-runs.tgz") if a.own_restart else {}
    cost = fid.measured_cost(*fid.load_live(fid.LIVE_TGZ)) if a.own_restart else None
    qps = live["meta"]["qps"]
    if abs(qps - pred["qps"]) > 1e-9 or live["meta"]["window"] != pred["window"]:
        print(f"the live runs ({qps} req/s, window {live['meta']['window']}) are not the prediction's "
              f"({pred['qps']} req/s, window {pred['window']})", file=sys.stderr)
        return 2
    kill = {(e["policy"], e["seed"]): e for e in live["meta"]["fault_events"]}
    rows = []
    for run in live["runs"]:
        pol, seed = run["policy"], run["seed"]
        if (pol, seed) not in kill or seed not in pred["seeds"]:
            continue
        key = f"{pol}-seed{seed}"
        identical = check_workload(recs[key], seed, qps)["identical"]
        e = kill[(pol, seed)]
        out_end = run.get("outage_end_s")
        live_row = {**{k: run.get(k) for k, *_ in FIELDS}, "recovered": run["recovered"],
                    "kill_to_serving_s": None if out_end is None else out_end - e["injected_s"]}
        row = {"policy": pol, "seed": seed, "workload_identical": identical, "live": live_row, "predicted": {}}
        for c in pred["configs"]:
            p = c["runs"][pol][seed]
            row["predicted"][f"{c['cost']}/{c['gate']}"] = {**{k: p.get(k) for k, *_ in FIELDS}, "recovered": p["recovered"]}
        if (a.own_restart and live_row["kill_to_serving_s"] is not None
                and {"disk_to_host_s", "weights_to_device_s"} <= set(phases.get(key, {}))):
            restart = own_restart_cfg(live_row["kill_to_serving_s"], phases[key])
            row["own_restart"] = restart
            row["predicted"]["measured-prefill/ema, own restart"] = simulate_with_own_restart(
                cost, pol, seed, qps, pred["window"], restart)
        rows.append(row)
    if not rows:
        print("no live failure run matches a predicted policy and seed", file=sys.stderr)
        return 2
    head = f"{'run':22s} {'source':36s} " + " ".join(f"{lab:>15s}" for _, lab, *_ in FIELDS) + "  recovered"
    print(f"prediction {a.prediction} (made before the runs) against live {a.live}, {qps:g} req/s")
    print(head)
    for r in rows:
        name = f"{r['policy']}-seed{r['seed']}" + ("" if r["workload_identical"] else " (workload differs!)")
        for src, v in (("live", r["live"]), *r["predicted"].items()):
            print(f"{name:22s} {src:36s} " + " ".join(f"{fmt(v[k], sc, d):>15s}" for k, _, sc, d in FIELDS)
                  + f"  {'yes' if v['recovered'] else 'no (censored)'}")
            name = ""
    if a.out:
        a.out.write_text(json.dumps({"prediction": str(a.prediction), "live": str(a.live), "qps": qps, "rows": rows},
                                    indent=1, default=lambda x: None))
    return 0 if all(r["workload_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
