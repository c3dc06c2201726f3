"""lumen bench end to end against a real `lumen serve` cluster (real worker processes, a real
SIGKILL). Slow: two cluster starts per policy; select with `-m "cluster and slow"`."""

from __future__ import annotations

import json

import pytest
from cluster_util import lumen_worker_processes, make_tiny_model_dir

from lumen.bench import BenchConfig, run_bench
from lumen.metrics import NO_FAILURE

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def test_bench_kills_a_real_worker_and_measures_recovery(tiny_dir, tmp_path):
    before = set(lumen_worker_processes())
    cfg = BenchConfig(
        model=tiny_dir,
        workers=2,
        policies=["stop-restart"],
        qps=4.0,
        requests=48,
        lengths="fixed:32:16",
        fail=["t=4s:worker=1:SIGKILL"],
        repeats=1,
        window=6,
        out=str(tmp_path / "out"),
        startup_timeout_s=300,
        request_timeout_s=120,
        quiet=True,
    )
    res = run_bench(cfg)
    ref, run = res.runs
    assert ref.policy == NO_FAILURE and run.policy == "stop-restart"
    # DESIGN §4.1: nothing accepted is lost, and every stream ends with exactly max_tokens tokens
    for r in ref.records + run.records:
        assert r.error is None, r.error
        assert r.output_tokens == 16 and r.first_token is not None and r.finish >= r.first_token
    (ev,) = run.events
    assert ev.verified and ev.error is None and 4.0 <= ev.injected_s < 6.0
    # the gateway names the workers that produced each request's tokens (the `lumen` extension): real
    # worker ids, and a request that survived the kill was finished by another worker than the one killed
    for r in ref.records + run.records:
        assert r.workers and set(r.workers) <= {0, 1}, r.workers
    for r in run.records:
        if r.interrupted:
            assert r.workers[-1] != ev.worker, r.workers
    assert [w["failed"] for w in run.summary.per_worker["workers"] if w["worker"] == ev.worker] == [True]
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["meta"]["fault_events"][0]["pid"] == ev.pid
    s = run.summary
    assert s.failure_times == [ev.injected_s] and s.n_requests == 48
    # the killed worker's return, from the controller's serving_at, bounds the outage figures
    assert ev.injected_s < s.outage_end_s < ev.injected_s + 120 and s.outage_ttft_vs_baseline > 0
    # no orphans: every worker this test started is gone
    assert set(lumen_worker_processes()) <= before
