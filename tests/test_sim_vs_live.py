"""benchmarks/sim_vs_live_failures.py on the committed H100 runs: every live failure run is matched with
the prediction's run of the same policy and seed, on the identical workload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIVE = ROOT / "docs/results/gpu-2026-12-07d-slots-q2.7"


def test_the_prediction_is_set_beside_each_live_failure_run(tmp_path):
    out = tmp_path / "cmp.json"
    p = subprocess.run([sys.executable, "benchmarks/sim_vs_live_failures.py", "--live", str(LIVE), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["policy"], r["seed"]) for r in rows) == [("lumen", 0), ("lumen-no-spec", 0), ("lumen-no-spec", 1)]
    assert all(r["workload_identical"] for r in rows)
    for r in rows:
        assert set(r["predicted"]) == {"profile/exact", "measured-prefill/ema"}
        assert r["live"]["n_interrupted"] > 0 and 0 < r["live"]["kill_to_serving_s"] < 48
    # the live figures are the bench's own (results.json), not recomputed here
    live = {(r["policy"], r["seed"]): r for r in json.loads((LIVE / "results.json").read_text())["runs"]}
    assert rows[0]["live"]["affected_ttft_mean"] == live[(rows[0]["policy"], rows[0]["seed"])]["affected_ttft_mean"]


def test_runs_at_another_rate_are_refused(tmp_path):
    bad = tmp_path / "live"
    bad.mkdir()
    doc = json.loads((LIVE / "results.json").read_text())
    doc["meta"]["qps"] = 2.1
    (bad / "results.json").write_text(json.dumps(doc))
    (bad / "bench-runs.tgz").write_bytes((LIVE / "bench-runs.tgz").read_bytes())
    p = subprocess.run([sys.executable, "benchmarks/sim_vs_live_failures.py", "--live", str(bad)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not the prediction's" in p.stderr


def test_with_each_runs_own_reload_the_simulated_worker_returns_when_the_live_one_did(tmp_path):
    out = tmp_path / "cmp.json"
    p = subprocess.run([sys.executable, "benchmarks/sim_vs_live_failures.py", "--live", str(LIVE), "--own-restart",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3
    for r in rows:
        own = r["predicted"]["measured-prefill/ema, own restart"]
        # the reload phases come from the run's end state; the simulator adds its detection and slot waits
        assert abs(own["kill_to_serving_s"] - r["live"]["kill_to_serving_s"]) < 0.5, r
        assert r["own_restart"]["disk_gbps"] > 0.5 and r["own_restart"]["restart_s"] > 0


H200 = ROOT / "docs/results/gpu-2026-12-07e-slots-q2.7-h200"


def test_the_h200_runs_give_their_own_step_cost_and_restart():
    """The parametrised loaders on the H200 archive: costs from several no-failure runs, the restart
    from the failure runs' end states (benchmarks/sim_fidelity_slots_gpu.py --cost-runs/--restart-runs)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sim_fidelity_slots_gpu as fid
    import sim_vs_live_failures as svl

    tgz = H200 / "bench-runs.tgz"
    pairs = fid.live_runs(tgz, ["no-failure-seed1", "no-failure-seed2"])
    assert [len(recs) for recs, _ in pairs] == [130, 130]
    # the fit of every worker of both runs, and each run's alone (one run: as before)
    both, coefs = fid.live_fit_cost(*(run for _, run in pairs))
    one = [fid.live_fit_cost(run)[0] for _, run in pairs]
    assert len(coefs) == 8
    assert both.coef[0] == pytest.approx((one[0].coef[0] + one[1].coef[0]) / 2)
    assert 0.004 < both.step_time(0, 1, 1100) < 0.007          # an H200 decode step, ~5.5 ms
    meas = fid.measured_cost(*pairs[0], *pairs[1:])
    m1, m2 = (fid.prefill_medians(recs) for recs, _ in pairs)
    assert meas.single_s == pytest.approx((m1[2] + m2[2]) / 2) and meas.single_s > 0.07   # longer than a slot
    # kill -> SERVING from a run's end state is the bench's (results.json: outage_end_s - the kill)
    live = json.loads((H200 / "results.json").read_text())
    kill = {(e["policy"], e["seed"]): e["injected_s"] for e in live["meta"]["fault_events"]}
    bench = {(r["policy"], r["seed"]): r["outage_end_s"] - kill[(r["policy"], r["seed"])]
             for r in live["runs"] if (r["policy"], r["seed"]) in kill}
    names = ["stop-restart-seed0", "lumen-no-spec-seed1"]
    reloads = [fid.reload_of(run) for _, run in fid.live_runs(tgz, names)]
    assert [k for k, _ in reloads] == pytest.approx([bench[("stop-restart", 0)], bench[("lumen-no-spec", 1)]])
    assert fid.reload_of(pairs[0][1]) is None                  # no kill in a no-failure run
    # one reload calibrates as --own-restart does; two: the mean of each phase
    assert fid.restart_from_reloads(reloads[:1]) == pytest.approx(svl.own_restart_cfg(*reloads[0]))
    two = fid.restart_from_reloads(reloads)
    disk = [fid.reload_parts(k, p)[1] for k, p in reloads]
    assert two["disk_gbps"] == pytest.approx(fid.WEIGHT_BYTES / (sum(disk) / 2) / 1e9)
    # a step overhead moves the decode steps only
    more = fid.with_step_overhead(meas, 0.001)
    assert more.step_time(0, 3, 3000) == pytest.approx(meas.step_time(0, 3, 3000) + 0.001)
    assert more.step_time(400, 3, 3000) == meas.step_time(400, 3, 3000)
