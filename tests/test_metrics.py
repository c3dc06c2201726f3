"""lumen.metrics: TTFT/TPOT, the recovery-time definition on hand-made inputs, CIs, reports."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats

from lumen.metrics import (
    NO_FAILURE,
    RequestRecord,
    aggregate,
    ci95,
    format_ci,
    plot_policy_bars,
    plot_ttft_timeline,
    recovery_period,
    render_table,
    summarize_run,
    tpot,
    ttft,
    write_aggregate_csv,
    write_json,
    write_runs_csv,
)

GAP = 0.1  # seconds between arrivals
W = 10  # window size used by the hand-made cases


def run(ttfts_per_window, w=W, tpot_s=0.05, out=11, interrupted=()):
    """One record per request; window k's requests all have TTFT ttfts_per_window[k]."""
    recs = []
    for k, t in enumerate(ttfts_per_window):
        for j in range(w):
            i = k * w + j
            a = i * GAP
            ft = a + t
            recs.append(RequestRecord(i, a, ft, ft + tpot_s * (out - 1), 100, out, interrupted=i in interrupted))
    return recs


def test_ttft_tpot_definitions():
    r = RequestRecord(0, 1.0, 1.5, 3.5, 10, 5)
    assert ttft(r) == pytest.approx(0.5)
    assert tpot(r) == pytest.approx(0.5)  # (3.5 - 1.5) / (5 - 1)
    assert math.isnan(tpot(RequestRecord(0, 1.0, 1.5, 1.5, 10, 1)))  # one token: undefined
    assert math.isnan(ttft(RequestRecord(0, 1.0, None, None, 10, 0, error="http: 503")))
    # failed after the first token: TTFT kept, TPOT undefined
    failed = RequestRecord(0, 1.0, 1.2, 2.0, 10, 4, error="stream: reset")
    assert ttft(failed) == pytest.approx(0.2) and math.isnan(tpot(failed))


def test_step_change_recovers():
    base = run([1.0] * 10)
    fail = run([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    p = recovery_period(fail, base, window=W)
    assert p.degraded and p.recovered
    assert (p.start_window, p.end_window) == (3, 6)
    # first arrival of window 6 minus first arrival of window 3
    assert p.recovery_time_s == pytest.approx((60 - 30) * GAP)
    assert sorted(p.affected_req_ids) == list(range(30, 60))
    s = summarize_run(fail, base, window=W, policy="x")
    assert s.recovery_time_s == pytest.approx(3.0)
    assert s.affected_requests == 30
    assert s.affected_ttft_mean == pytest.approx(2.0)
    assert s.affected_ttft_p99 == pytest.approx(2.0)
    assert s.affected_tpot_mean == pytest.approx(0.05)


def test_threshold_is_strictly_more_than_5_percent():
    base = run([1.0] * 8)
    p = recovery_period(run([1.0, 1.04, 1.04, 1.0, 1.0, 1.0, 1.0, 1.0]), base, window=W)
    assert not p.degraded and p.recovery_time_s == 0.0
    p = recovery_period(run([1.0, 1.06, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), base, window=W)
    assert (p.start_window, p.end_window) == (1, 2)
    # better than baseline counts as within
    p = recovery_period(run([1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]), base, window=W)
    assert not p.degraded


def test_needs_settle_consecutive_windows():
    base = run([1.0] * 12)
    # window 4 is within but alone; window 5 degrades again; 6,7,8 recover
    fail = run([1.0, 1.0, 1.0, 3.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    p = recovery_period(fail, base, window=W)
    assert (p.start_window, p.end_window) == (3, 6)
    assert p.recovery_time_s == pytest.approx(3.0)
    assert len(p.affected_req_ids) == 30  # windows 3, 4, 5 (the within-window 4 stays in)
    p1 = recovery_period(fail, base, window=W, settle=1)
    assert (p1.start_window, p1.end_window) == (3, 4)


def test_slow_drift_never_recovers():
    n = 20
    base = run([1.0] * n)
    fail = run([1.0 + 0.01 * k for k in range(n)])  # +1% per window, crosses 5% at window 6
    p = recovery_period(fail, base, window=W)
    assert p.degraded and not p.recovered
    assert p.start_window == 6 and p.end_window is None
    last_finish = max(r.finish for r in fail)
    assert p.end_time == pytest.approx(last_finish)
    assert p.recovery_time_s == pytest.approx(last_finish - 60 * GAP)
    assert len(p.affected_req_ids) == (n - 6) * W


def test_drift_up_then_back_recovers():
    base = run([1.0] * 14)
    ramp = [1.0, 1.0, 1.03, 1.08, 1.2, 1.3, 1.2, 1.1, 1.06, 1.04, 1.02, 1.0, 1.0, 1.0]
    p = recovery_period(run(ramp), base, window=W)
    assert (p.start_window, p.end_window) == (3, 9)
    assert p.recovered and p.recovery_time_s == pytest.approx(6 * W * GAP)


def test_no_degradation_is_zero():
    base = run([1.0] * 10)
    s = summarize_run(run([1.02] * 10), base, window=W, policy="p")
    assert s.recovery_time_s == 0.0 and s.recovered and not s.degraded
    assert s.affected_requests == 0 and math.isnan(s.affected_ttft_mean)
    same = summarize_run(base, base, window=W, policy=NO_FAILURE)
    assert same.recovery_time_s == 0.0 and same.recovered


def test_degradation_that_never_recovers():
    base = run([1.0] * 10)
    fail = run([1.0] * 4 + [5.0] * 6)
    p = recovery_period(fail, base, window=W)
    assert p.start_window == 4 and not p.recovered
    assert p.recovery_time_s == pytest.approx(max(r.finish for r in fail) - 4 * W * GAP)
    # only 2 within-windows left at the end: still not recovered (needs 3)
    p = recovery_period(run([1.0] * 4 + [5.0] * 4 + [1.0] * 2), base, window=W)
    assert p.degraded and not p.recovered


def test_errors_without_tokens_make_a_window_degraded():
    base = run([1.0] * 6)
    fail = run([1.0] * 6)
    for r in fail[20:30]:  # every request of window 2 failed before its first token
        r.first_token, r.finish, r.error = None, None, "http: 503"
    p = recovery_period(fail, base, window=W)
    assert (p.start_window, p.end_window) == (2, 3)
    s = summarize_run(fail, base, window=W)
    assert s.n_errors == 10 and s.error_counts == {"http": 10}


def test_partial_last_window_and_matching_by_req_id():
    base = run([1.0] * 3)[:25]
    fail = list(reversed(run([1.0, 1.0, 2.0])[:25]))  # order of the input does not matter
    p = recovery_period(fail, base, window=W)
    assert p.n_windows == 3 and p.start_window == 2 and not p.recovered
    other = [RequestRecord(1000 + i, 0.0, 1.0, 2.0, 1, 2) for i in range(5)]
    with pytest.raises(ValueError, match="different workloads"):
        recovery_period(other, base, window=W)
    with pytest.raises(ValueError, match="duplicate"):
        recovery_period(fail + fail[:1], base, window=W)


def test_not_before_ignores_pre_failure_noise():
    base = run([1.0] * 12)
    fail = run([1.0, 1.3, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    exact = recovery_period(fail, base, window=W)
    assert exact.start_window == 1  # the paper's rule takes the noise
    failure_at = 45 * GAP + 0.5  # every request of windows 0-3 had its first token by then
    p = recovery_period(fail, base, window=W, not_before=failure_at)
    assert (p.start_window, p.end_window) == (5, 7)


def test_interrupted_tpot_and_overall_means():
    base = run([1.0] * 5)
    fail = run([1.0] * 5, interrupted={3, 4})
    fail[3].finish += 1.0  # 10 gaps -> +0.1 s/token
    s = summarize_run(fail, base, window=W, failure_times=[2.0])
    assert s.n_interrupted == 2
    assert s.interrupted_tpot_mean == pytest.approx((0.15 + 0.05) / 2)
    assert s.ttft_mean == pytest.approx(1.0)
    assert s.failure_times == [2.0]


def test_the_outage_compares_the_kill_to_the_return_with_the_same_arrivals_without_failure():
    """Arrivals from the failure (t = 2 s) to the killed worker's return (t = 4 s) are windows 2-3
    of 10 requests each (0.1 s apart): 2.0 s TTFT there against 1.0 s without failure."""
    base = run([1.0] * 6)
    fail = run([1.0, 1.0, 2.0, 2.0, 1.0, 1.0], tpot_s=0.1)
    s = summarize_run(fail, base, window=W, failure_times=[2.0], outage_end=4.0)
    assert s.outage_end_s == 4.0
    assert s.outage_ttft_mean == pytest.approx(2.0) and s.baseline_outage_ttft_mean == pytest.approx(1.0)
    assert s.outage_ttft_vs_baseline == pytest.approx(2.0) and s.outage_tpot_vs_baseline == pytest.approx(2.0)
    # a failure that cost nothing reads 1; unknown return or no failure: undefined, not a guess
    assert summarize_run(base, base, window=W, failure_times=[2.0], outage_end=4.0).outage_ttft_vs_baseline == 1.0
    assert math.isnan(summarize_run(fail, base, window=W, failure_times=[2.0]).outage_ttft_vs_baseline)
    assert math.isnan(summarize_run(fail, base, window=W, outage_end=4.0).outage_ttft_mean)


@pytest.mark.parametrize("n", [2, 3, 5, 17])
def test_ci95_matches_scipy(n):
    x = np.random.default_rng(n).normal(10.0, 3.0, size=n)
    m, hw = ci95(x)
    lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert m == pytest.approx(x.mean())
    assert m - hw == pytest.approx(lo) and m + hw == pytest.approx(hi)


def test_ci95_edge_cases():
    assert all(math.isnan(v) for v in ci95([]))
    m, hw = ci95([4.0])
    assert m == 4.0 and math.isnan(hw)
    m, hw = ci95([1.0, float("nan"), 3.0])  # NaN dropped
    assert m == 2.0 and hw == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2))
    assert ci95([5.0, 5.0, 5.0]) == (5.0, 0.0)


def _summaries():
    base = run([1.0] * 10)
    out = [summarize_run(base, base, window=W, policy=NO_FAILURE, seed=0)]
    for seed, (h, n_bad) in enumerate([(2.0, 3), (3.0, 4), (2.5, 3)]):
        fail = run([1.0] * 3 + [h] * n_bad + [1.0] * (7 - n_bad))
        out.append(summarize_run(fail, base, window=W, policy="stop-restart", seed=seed, failure_times=[3.0]))
        fail = run([1.0] * 3 + [h / 2] * (n_bad - 1) + [1.0] * (8 - n_bad))
        out.append(summarize_run(fail, base, window=W, policy="lumen", seed=seed, failure_times=[3.0]))
    return out


def test_aggregate_groups_by_policy_with_cis():
    summ = _summaries()
    agg = {a.policy: a for a in aggregate(summ)}
    assert list(agg) == [NO_FAILURE, "stop-restart", "lumen"]
    sr = agg["stop-restart"]
    assert sr.repeats == 3 and sr.recovered == 3 and sr.seeds == [0, 1, 2]
    times = [s.recovery_time_s for s in summ if s.policy == "stop-restart"]
    assert times == pytest.approx([3.0, 4.0, 3.0])
    m, hw = ci95(times)
    assert sr.metrics["recovery_time_s"].mean == pytest.approx(m)
    assert sr.metrics["recovery_time_s"].half_width == pytest.approx(hw)
    assert sr.metrics["recovery_time_s"].n == 3
    nf = agg[NO_FAILURE].metrics["affected_ttft_mean"]
    assert math.isnan(nf.mean) and nf.n == 0


def test_reports_and_plots(tmp_path):
    summ = _summaries()
    agg = aggregate(summ)
    doc = json.loads(write_json(tmp_path / "r.json", summ, agg, {"qps": 1.0}).read_text())
    assert doc["meta"] == {"qps": 1.0} and len(doc["runs"]) == 7
    assert doc["runs"][0]["affected_ttft_mean"] is None  # NaN -> null
    rows = list(csv.DictReader(write_runs_csv(tmp_path / "runs.csv", summ).open()))
    assert len(rows) == 7 and rows[1]["policy"] == "stop-restart" and float(rows[1]["recovery_time_s"]) == 3.0
    arows = list(csv.DictReader(write_aggregate_csv(tmp_path / "agg.csv", agg).open()))
    assert [r["policy"] for r in arows] == [NO_FAILURE, "stop-restart", "lumen"]
    assert float(arows[1]["recovery_time_s_mean"]) == pytest.approx(10 / 3)
    from rich.console import Console

    con = Console(record=True, width=300)
    con.print(render_table(agg))
    text = con.export_text()
    assert "stop-restart" in text and "lumen" in text and "3.3 ± " in text and "3/3" in text
    assert format_ci(float("nan"), 1.0) == "-" and format_ci(1.0, float("nan")) == "1.00"
    for p in (plot_ttft_timeline(summ, tmp_path / "t.png"), plot_policy_bars(agg, tmp_path / "b.png")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def _wide_aggregates():
    """Every policy of the paper's comparison with four-digit P99s: the widest table a bench prints."""
    from lumen.metrics import CI, METRICS, PolicyAggregate

    def agg(policy, v):
        return PolicyAggregate(policy, 5, 4, [0, 1, 2, 3, 4], {m: CI(v, v / 3, 5) for m in METRICS})

    return [agg(NO_FAILURE, 0.0)] + [agg(p, v) for p, v in [("stop-restart", 12.345), ("fixed-ckpt", 9.87),
                                                            ("lumen", 5.4), ("lumen-no-spec", 6.5),
                                                            ("spec-only", 11.1)]]


def test_the_bench_table_is_whole_when_piped(monkeypatch):
    """Piped to a file or a CI log rich would fall back to 80 columns and cut the headers with "…";
    report_console + print_fitted render it at its own width instead."""
    import io

    from rich.console import Console

    from lumen.metrics.report import _TABLE, PIPE_WIDTH, print_fitted, report_console

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    headers = ["policy", "runs rec/all", *(h for h, *_ in _TABLE)]
    squeezed = io.StringIO()
    Console(file=squeezed).print(render_table(_wide_aggregates()))
    assert "…" in squeezed.getvalue()  # the problem, at rich's default 80 columns
    for con in (report_console(file=io.StringIO()), Console(file=io.StringIO())):
        assert not con.file.isatty()
        print_fitted(con, render_table(_wide_aggregates()))
        text = con.file.getvalue()
        assert "…" not in text
        lines = text.splitlines()
        for h in headers + ["12345 ± 4115", "lumen-no-spec", "4/5"]:
            assert any(h in line for line in lines), h  # on one line: neither cut nor wrapped
        assert max(len(line) for line in lines) > 80
    assert report_console(file=io.StringIO()).width == PIPE_WIDTH
    # FORCE_COLOR (CI runners) makes rich call a log file a terminal; it still has no width to keep
    monkeypatch.setenv("FORCE_COLOR", "1")
    con = report_console(file=io.StringIO())
    assert con.is_terminal and con.width == PIPE_WIDTH
    print_fitted(con, render_table(_wide_aggregates()))
    assert "…" not in con.file.getvalue()


def test_report_console_keeps_a_terminals_width(monkeypatch):
    import io

    from rich.text import Text

    from lumen.metrics.report import print_fitted, report_console

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "100")
    tty = report_console(file=Tty())
    assert tty.width == 100
    print_fitted(tty, render_table(_wide_aggregates()))
    shown = Text.from_ansi(tty.file.getvalue()).plain.splitlines()
    assert max(len(line) for line in shown) <= 100  # a terminal is not overrun
    assert report_console(file=io.StringIO()).width == 100  # an explicit $COLUMNS is kept for pipes too
    assert report_console(file=io.StringIO(), width=90).width == 90


def _capacity_runs(ratios):
    """Synthetic failure runs: {(policy, seed): outage_ttft_vs_baseline}, plus each seed's no-failure run."""
    base = run([1.0] * 10)
    out = []
    for seed in sorted({s for _, s in ratios}):
        out.append(summarize_run(base, base, window=W, policy=NO_FAILURE, seed=seed))
        for (policy, s), r in ratios.items():
            if s == seed:
                summ = summarize_run(base, base, window=W, policy=policy, seed=seed, failure_times=[3.0])
                summ.outage_ttft_vs_baseline = r
                out.append(summ)
    return out


def test_capacity_check_flags_seeds_whose_failure_cost_no_capacity(tmp_path):
    """DESIGN.md §5: where stop-restart's outage TTFT is no worse than without the failure, the
    survivors absorbed the dead worker's share and no recovery comparison from that seed means anything."""
    from lumen.metrics.report import capacity_warnings
    from lumen.metrics.summary import check_capacity

    summ = _capacity_runs({("stop-restart", 0): 0.93, ("lumen", 0): 0.9, ("stop-restart", 1): 1.8,
                           ("lumen", 1): 0.95, ("stop-restart", 2): 1.0, ("lumen", 2): 1.2})
    check = check_capacity(summ)
    assert check["no_capacity_loss_seeds"] == [0, 2] and check["unchecked_seeds"] == []
    assert [(d["seed"], d["capacity_lost"], d["basis"]) for d in check["seeds"]] == [
        (0, False, ["stop-restart"]), (1, True, ["stop-restart"]), (2, False, ["stop-restart"])]
    assert check["no_capacity_loss_runs"] == [
        {"policy": "stop-restart", "seed": 0, "outage_ttft_vs_baseline": 0.93},
        {"policy": "lumen", "seed": 0, "outage_ttft_vs_baseline": 0.9},
        {"policy": "stop-restart", "seed": 2, "outage_ttft_vs_baseline": 1.0},
        {"policy": "lumen", "seed": 2, "outage_ttft_vs_baseline": 1.2}]
    # every failure run carries its seed's verdict (lumen's 0.95 in seed 1 hides nothing: stop-restart lost)
    assert [(s.policy, s.seed, s.capacity_lost) for s in summ] == [
        (NO_FAILURE, 0, None), ("stop-restart", 0, False), ("lumen", 0, False),
        (NO_FAILURE, 1, None), ("stop-restart", 1, True), ("lumen", 1, True),
        (NO_FAILURE, 2, None), ("stop-restart", 2, False), ("lumen", 2, False)]
    lines = capacity_warnings(check)
    assert len(lines) == 1 and lines[0].startswith("[bold red]WARNING: the failure cost no capacity")
    assert "seed 0 (outage TTFT × stop-restart 0.93)" in lines[0] and "seed 2 (" in lines[0]
    assert "seed 1" not in lines[0] and "no_capacity_loss_runs" in lines[0]
    rows = list(csv.DictReader(write_runs_csv(tmp_path / "runs.csv", summ).open()))
    assert [r["capacity_lost"] for r in rows] == ["", "False", "False", "", "True", "True", "", "False", "False"]
    doc = json.loads(write_json(tmp_path / "r.json", summ, aggregate(summ), {}, extra={
        "no_capacity_loss_runs": check["no_capacity_loss_runs"]}).read_text())
    assert [(r["policy"], r["seed"]) for r in doc["no_capacity_loss_runs"]][:2] == [("stop-restart", 0), ("lumen", 0)]
    assert [r["capacity_lost"] for r in doc["runs"]][:3] == [None, False, False]
    # all is well: no lines at all
    assert capacity_warnings(check_capacity(_capacity_runs({("stop-restart", 0): 1.5, ("lumen", 0): 1.1}))) == []


def test_capacity_check_without_stop_restart_or_without_an_outage():
    from lumen.metrics.report import capacity_warnings
    from lumen.metrics.summary import check_capacity

    # stop-restart not run: the other policies judge, and the warning says so
    check = check_capacity(_capacity_runs({("fixed-ckpt", 0): 0.97, ("lumen", 0): 0.92,
                                           ("fixed-ckpt", 1): 1.4, ("lumen", 1): 0.99}))
    assert [(d["seed"], d["capacity_lost"], d["basis"], d["basis_is_reference"]) for d in check["seeds"]] == [
        (0, False, ["fixed-ckpt", "lumen"], False), (1, True, ["fixed-ckpt", "lumen"], False)]
    red, note = capacity_warnings(check)
    assert "seed 0 (outage TTFT × fixed-ckpt 0.97, lumen 0.92)" in red and "seed 1" not in red
    assert note.startswith("[yellow]capacity check without stop-restart") and "seed 1: judged from" in note
    # no outage measured (no SIGKILL, or the worker's return unknown): the check could not be made
    check = check_capacity(_capacity_runs({("stop-restart", 0): math.nan, ("lumen", 0): math.nan}))
    assert check["unchecked_seeds"] == [0] and check["seeds"][0]["capacity_lost"] is None
    assert check["seeds"][0]["outage_ttft_vs_baseline"] == {"stop-restart": None, "lumen": None}
    (line,) = capacity_warnings(check)
    assert line.startswith("[yellow]capacity check could not be made for seed(s) 0")
    # stop-restart's outage unknown in one seed: the others judge that seed
    check = check_capacity(_capacity_runs({("stop-restart", 0): math.nan, ("lumen", 0): 1.3}))
    assert check["seeds"][0]["capacity_lost"] is True and check["seeds"][0]["basis"] == ["lumen"]


def test_capacity_check_measures_the_run_to_run_noise_before_the_failure():
    """Before the failure a failure run serves the same requests as its no-failure run: their TTFT ratio there
    is noise alone, and a loss no larger than it is flagged, not taken for a loss of capacity."""
    from lumen.metrics.report import capacity_warnings
    from lumen.metrics.summary import check_capacity

    base = run([1.0] * 10)
    fail_at = 5 * W * GAP  # windows 0-4 arrive before it
    # the failure run was 20% slower before the failure; window 4 queued through it (first tokens after the
    # failure: its TTFT holds the outage, so it is left out) and window 3's last requests are interrupted
    slow = run([1.2, 1.2, 1.2, 1.2, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0], interrupted=range(3 * W + 5, 4 * W))
    s = summarize_run(slow, base, window=W, policy="stop-restart", seed=0, failure_times=[fail_at],
                      outage_end=8 * W * GAP)
    assert s.pre_failure_ttft_vs_baseline == pytest.approx(1.2)
    ref = summarize_run(base, base, window=W, policy=NO_FAILURE, seed=0)
    s.outage_ttft_vs_baseline = 1.15  # a loss smaller than the noise: within it
    check = check_capacity([ref, s])
    assert check["seeds"][0]["capacity_lost"] is True and check["seeds"][0]["noise"] == pytest.approx(0.2)
    assert check["within_noise_seeds"] == [0]
    (line,) = capacity_warnings(check)
    assert line.startswith("[yellow]the capacity loss is within the run-to-run noise in seed 0")
    assert "outage TTFT × stop-restart 1.15; before the failure stop-restart 1.20" in line
    s.outage_ttft_vs_baseline = 1.5  # larger than the noise: a loss, no note
    check = check_capacity([ref, s])
    assert check["within_noise_seeds"] == [] and capacity_warnings(check) == []
    # no failure time, no pre-failure ratio
    assert math.isnan(summarize_run(base, base, window=W, policy="lumen", seed=0).pre_failure_ttft_vs_baseline)


def test_paper_verdict_says_whether_lumen_beat_stop_restart():
    from lumen.metrics.report import paper_verdict
    from lumen.metrics.summary import CI, METRICS, PolicyAggregate

    def agg(policy, rec, ttft, tpot, recovered=1):
        m = {k: CI(float("nan"), float("nan"), 0) for k in METRICS}
        m.update(recovery_time_s=CI(rec, 0.0, 1), affected_ttft_mean=CI(ttft, 0.0, 1),
                 affected_tpot_mean=CI(tpot, 0.0, 1))
        return PolicyAggregate(policy=policy, repeats=1, recovered=recovered, seeds=[0], metrics=m)

    good = paper_verdict([agg("stop-restart", 90, 1.5, 0.8, recovered=0), agg("lumen", 30, 1.2, 0.7)], {})
    assert len(good) == 1 and "as the paper reports" in good[0] and "recovery time 30 vs 90 s (-67%)" in good[0]
    assert "not recovered within the run: stop-restart" in good[0]
    bad = paper_verdict([agg("stop-restart", 20, 1.0, 0.5), agg("lumen", 30, 1.2, 0.7)], {})
    assert "not what the paper reports" in bad[0]
    assert "mixed" in paper_verdict([agg("stop-restart", 40, 1.0, 0.5), agg("lumen", 30, 1.2, 0.7)], {})[0]
    none = paper_verdict([agg("stop-restart", 40, 1.0, 0.5), agg("lumen", 30, 1.2, 0.7)],
                         {"no_capacity_loss_seeds": [0]})
    assert "cost no capacity" in none[0]
    assert paper_verdict([agg("lumen", 30, 1.2, 0.7)], {}) == []
    # a loss within the run-to-run noise: the verdict stands, and says how little it rests on
    weak = paper_verdict([agg("stop-restart", 90, 1.5, 0.8), agg("lumen", 30, 1.2, 0.7)],
                         {"within_noise_seeds": [0, 2]})[0]
    assert "as the paper reports" in weak and "within the run-to-run noise in seed(s) 0, 2" in weak
    assert "one seed ranks nothing" in good[0]

    def agg2(policy, ttft, hw):  # two seeds: a mean and its CI half-width
        m = {k: CI(float("nan"), float("nan"), 0) for k in METRICS}
        m.update(affected_ttft_mean=CI(ttft, hw, 2))
        return PolicyAggregate(policy=policy, repeats=2, recovered=2, seeds=[0, 1], metrics=m)

    wide = paper_verdict([agg2("stop-restart", 1.5, 0.4), agg2("lumen", 1.2, 0.4)], {})[0]
    assert "no ranking, every 95% CI overlaps" in wide and "(-20%, CIs overlap)" in wide and "one seed" not in wide
    narrow = paper_verdict([agg2("stop-restart", 1.5, 0.1), agg2("lumen", 1.2, 0.1)], {})[0]
    assert "as the paper reports" in narrow and "CIs overlap" not in narrow
