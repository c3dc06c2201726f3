"""lumen.sim cost models, failure specs and the CLI."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest

from lumen.sim import (
    DEVICES,
    MODELS,
    FailurePlan,
    FailureSpec,
    RooflineCost,
    SimConfig,
    fit_profile,
    load_profile,
    parse_duration,
    parse_fail,
    read_profile,
    write_profile,
)
from lumen.sim import cli as simcli


def test_model_shapes_match_published_sizes():
    assert MODELS["llama-3-70b"].params / 1e9 == pytest.approx(70.55, abs=0.05)
    assert MODELS["llama-3-8b"].params / 1e9 == pytest.approx(8.03, abs=0.01)
    assert MODELS["qwen3-32b"].params / 1e9 == pytest.approx(32.76, abs=0.05)
    assert MODELS["smollm2-135m"].params / 1e6 == pytest.approx(134.5, abs=1.0)
    assert MODELS["llama-3-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    assert MODELS["qwen3-0.6b"].kv_bytes_per_token == 2 * 28 * 8 * 128 * 2


def test_roofline_decode_memory_bound_prefill_compute_bound():
    m, d = MODELS["llama-3-70b"], DEVICES["a100"]
    r = RooflineCost(m, d, tp=4, step_overhead_s=0.0, allreduce_latency_s=0.0)
    weights_time = m.weight_bytes / (4 * d.hbm_gb_s * 1e9 * 0.8)
    dec = r.step_time(0, 1, 100)
    assert weights_time < dec < weights_time * 1.05           # decode: reading the weights
    flops = 2 * m.params * 1024
    pf = r.step_time(1024, 0, 1024)
    assert pf == pytest.approx(flops / (4 * d.bf16_tflops * 1e12 * 0.6), rel=0.15)  # compute bound
    # monotone in every feature; H100 faster than A100
    assert r.step_time(0, 64, 64_000) > r.step_time(0, 64, 1_000) > r.step_time(0, 1, 1_000)
    assert RooflineCost(m, DEVICES["h100"], tp=4).step_time(1024, 0, 1024) < pf
    assert r.step_time(0, 0, 0) == 0.0


def test_fitted_cost_recovers_coefficients_and_roundtrips_csv(tmp_path):
    rng = np.random.default_rng(0)
    coef = (0.003, 4e-5, 2e-4, 3e-8, 2e-9)
    rows = []
    for _ in range(200):
        p, d = int(rng.integers(0, 1024)), int(rng.integers(0, 64))
        c = int(rng.integers(1, 100_000))
        t = coef[0] + coef[1] * p + coef[2] * d + coef[3] * c + coef[4] * p * p
        rows.append((p, d, c, t))
    f = fit_profile(rows)
    assert f.r2 > 0.999999 and f.mean_abs_rel_err < 1e-6
    assert np.allclose(f.coef, coef, rtol=1e-4, atol=1e-12)
    path = write_profile(tmp_path / "p.csv", rows)
    g = load_profile(path)
    assert g.step_time(512, 8, 5000) == pytest.approx(f.step_time(512, 8, 5000), rel=1e-6)
    assert read_profile(io.StringIO("# comment\nnum_prefill_tokens,num_decode_seqs,total_context_tokens,"
                                    "step_time_s,extra\n1,2,3,0.5,x\n")) == [(1.0, 2.0, 3.0, 0.5)]
    with pytest.raises(ValueError, match="lacks columns"):
        read_profile(io.StringIO("a,b\n1,2\n"))
    with pytest.raises(ValueError, match="at least 5"):
        fit_profile(rows[:3])


def test_parse_fail_and_durations():
    assert parse_duration("500ms") == 0.5 and parse_duration("2m") == 120 and parse_duration("7") == 7
    assert parse_fail("t=30s:worker=1") == FailureSpec(30.0, workers=(1,))
    assert parse_fail("t=1m:worker=1+3").workers == (1, 3)
    assert parse_fail("t=30s:count=4") == FailureSpec(30.0, count=4)
    f = parse_fail("t=25%:frac=0.25")
    assert f.t_frac and f.time(400.0) == 100.0 and f.to_spec() == "t=25%:frac=0.25"
    for bad in ("worker=1", "t=3s", "t=3s:worker=1:count=2", "t=3s:foo=1", "t=x:worker=1", "t=1s:frac=2"):
        with pytest.raises(ValueError):
            parse_fail(bad)


def test_failure_plan_is_seeded_and_mtbf_rate_is_right():
    plan = FailurePlan((FailureSpec(10.0, frac=0.25),))
    a, b = plan.events(64, seed=1, horizon=100), plan.events(64, seed=1, horizon=100)
    assert a == b and len(a) == 16 and len({w for _, w in a}) == 16
    assert plan.events(64, seed=2, horizon=100) != a
    ev = FailurePlan(mtbf_s=100.0).events(50, seed=0, horizon=1000.0)
    assert 400 < len(ev) < 600              # 50 workers x 10 expected failures each
    with pytest.raises(ValueError):
        FailurePlan((FailureSpec(1.0, workers=(9,)),)).events(4, 0, 10)


def test_config_validation_and_kv_capacity():
    with pytest.raises(ValueError):
        SimConfig(model="gpt-9")
    with pytest.raises(ValueError):
        SimConfig(alpha=1.5)
    c = SimConfig()   # 70B on 4 x 80 GB at 0.9: (288 GB - 141 GB) / 327,680 B
    assert c.kv_capacity_tokens() == int((4 * 80e9 * 0.9 - MODELS["llama-3-70b"].weight_bytes) // 327680)
    with pytest.raises(ValueError, match="does not fit"):
        SimConfig(tp=1).kv_capacity_tokens()


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    simcli.add_arguments(p)
    return p.parse_args(["--workers", "4", "--model", "qwen3-8b", "--device", "h100", "--tp", "1",
                         "--qps", "12", "--requests", "600", "--lengths", "sharegpt", "--repeats", "2",
                         "--fail", "t=20s:worker=1", "--out", str(tmp_path), "--quiet", *extra])


def test_cli_writes_bench_style_reports(tmp_path, capsys):
    assert simcli.run(_args(tmp_path, "--policy", "lumen", "--policy", "stop-restart")) == 0
    for f in ("summary.json", "runs.csv", "aggregate.csv", "ttft_timeline.png", "policy_bars.png"):
        assert (tmp_path / f).stat().st_size > 0
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [a["policy"] for a in doc["aggregates"]] == ["no-failure", "lumen", "stop-restart"]
    assert len(doc["runs"]) == 6 and doc["meta"]["config"]["workers"] == 4
    assert "lumen" in capsys.readouterr().out


def test_cli_sweep_and_profile(tmp_path):
    rows = [(p, d, p + 100 * d, 0.002 + 1e-5 * p + 1e-4 * d) for p in (0, 128, 512, 1024) for d in (1, 8, 32)]
    prof = write_profile(tmp_path / "prof.csv", rows)
    a = _args(tmp_path / "sw", "--policy", "lumen", "--policy", "stop-restart", "--sweep", "workers=2,4",
              "--profile", str(prof), "--no-plots", "--kv-tokens", "200000")
    assert simcli.run(a) == 0
    text = (tmp_path / "sw" / "sweep.csv").read_text().splitlines()
    assert text[0].startswith("workers,policy,affected_ttft_mean_change_vs_sr")
    assert len(text) == 3 and (tmp_path / "sw" / "workers=2" / "summary.json").exists()
    doc = json.loads((tmp_path / "sw" / "workers=4" / "summary.json").read_text())
    assert doc["meta"]["config"]["cost"] == "FittedCost"
