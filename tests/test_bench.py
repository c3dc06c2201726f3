"""lumen.bench: plan parsing, the load client, fault injection and the runner.

The client/runner tests run against tests/test_bench_fakeserver.py, a TEST DOUBLE of an
OpenAI-compatible server (not lumen's cluster); the end-to-end test against `lumen serve` is
separate (marked cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lumen.bench import (
    BenchConfig,
    ClientConfig,
    ClusterProcess,
    FaultInjectionError,
    FaultSpec,
    LoadClient,
    free_port,
    parse_fail_plan,
    parse_fault,
    prompt_token_ids,
    run_bench,
    run_plan,
    wait_ready,
)
from lumen.bench import runner as runner_mod
from lumen.bench.cli import DEMO_DEFAULTS, add_parser, config_from_args
from lumen.bench.faults import FaultEvent, inject
from lumen.metrics import NO_FAILURE, ttft
from lumen.workload import RequestSpec, make_workload

FAKE = Path(__file__).with_name("test_bench_fakeserver.py")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def fake(tmp_path):
    """A fake server subprocess (own process group) on a free port; yields its base URL."""
    port = free_port()
    c = ClusterProcess([sys.executable, str(FAKE), "--port", str(port), "--policy", "stop-restart"],
                       tmp_path / "fake.log", grace_s=5)
    c.start()
    url = f"http://127.0.0.1:{port}"
    try:
        info = asyncio.run(wait_ready(url, 30, 4, c.proc, c.log_path))
        c.note_workers(info)
        yield url, c
    finally:
        c.stop()


# ---- plans ---------------------------------------------------------------------------------


def test_parse_fault():
    assert parse_fault("t=30s:worker=1:SIGKILL") == FaultSpec(30.0, 1, signal.SIGKILL, None)
    assert parse_fault("t=30:worker=2") == FaultSpec(30.0, 2, signal.SIGKILL, None)
    assert parse_fault("t=500ms:worker=0:SIGSTOP:cont_after=5s") == FaultSpec(0.5, 0, signal.SIGSTOP, 5.0)
    assert parse_fault("t=1.5m:worker=3:stop") == FaultSpec(90.0, 3, signal.SIGSTOP, None)
    plan = parse_fail_plan(["t=20s:worker=2", "t=10s:worker=1"])
    assert [f.at_s for f in plan] == [10.0, 20.0]
    assert str(plan[0]) == "t=10s:worker=1:SIGKILL"


def test_busiest_worker_is_chosen_when_the_failure_is_injected():
    # the plan names no worker; at injection time the serving worker with the most requests dies
    assert parse_fault("t=25s:worker=busiest") == FaultSpec(25.0, "busiest", signal.SIGKILL, None)
    assert [str(f) for f in parse_fail_plan(["t=5s:worker=busiest", "t=5s:worker=1"])] == [
        "t=5s:worker=1:SIGKILL", "t=5s:worker=busiest:SIGKILL"]
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    loads = [(2, 0), (1, 4), (5, 0)]  # worker 1 and 2 tie at 5 requests; 2 is not serving
    workers = [{"id": i, "pid": p.pid, "host": "127.0.0.1", "state": "serving" if i != 2 else "switching",
                "load": {"num_running": r, "num_waiting": w}} for i, (p, (r, w)) in enumerate(zip(procs, loads, strict=True))]
    polls = []

    def cluster(request):  # idle for the first three polls: the injector waits for work
        polls.append(1)
        idle = [dict(w, load={"num_running": 0, "num_waiting": 0}) for w in workers]
        return httpx.Response(200, json={"workers": idle if len(polls) <= 3 else workers})

    transport = httpx.MockTransport(cluster)

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as http:
            ev = FaultEvent("t=0s:worker=busiest:SIGKILL", 0.0, worker=-1)
            await inject(http, parse_fault("t=0s:worker=busiest"), ev, time.monotonic)
            return ev

    try:
        ev = asyncio.run(go())
        assert len(polls) == 4 and ev.worker == 1 and ev.pid == procs[1].pid and ev.verified
        assert procs[1].wait(5) == -signal.SIGKILL and procs[0].poll() is None and procs[2].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize(
    "bad",
    ["worker=1", "t=3s", "t=x:worker=1", "t=3s:worker=a", "t=3s:worker=1:SIGTERM",
     "t=3s:worker=1:SIGKILL:cont_after=2s", "t=3s:worker=1:color=red"],
)
def test_parse_fault_errors(bad):
    with pytest.raises(ValueError):
        parse_fault(bad)


# ---- client --------------------------------------------------------------------------------


def test_prompt_token_ids_exact_and_seeded():
    s = RequestSpec(5, 0.0, 37, 4)
    ids = prompt_token_ids(s, (100, 200), seed=1)
    assert len(ids) == 37 and all(100 <= t < 200 for t in ids)
    assert ids == prompt_token_ids(s, (100, 200), seed=1)
    assert ids != prompt_token_ids(RequestSpec(6, 0.0, 37, 4), (100, 200), seed=1)


def test_client_replays_on_schedule_and_times_tokens(fake):
    url, _ = fake
    specs = make_workload(30, 20.0, "fixed:20:6", seed=1)
    seen = []
    client = LoadClient(ClientConfig(url=url))
    recs = asyncio.run(client.replay(specs, on_done=seen.append))
    assert client.model == "fake-model"  # discovered from /v1/models (the double 404s other names)
    assert [r.req_id for r in recs] == list(range(30)) and len(seen) == 30
    for r, s in zip(recs, specs, strict=True):
        assert r.error is None, r.error
        assert r.output_tokens == 6 and len(r.token_times) == 6
        assert r.arrival == s.arrival and r.prompt_tokens == 20
        assert 0 < ttft(r) < 2.0
        assert r.first_token == r.token_times[0] <= r.token_times[-1] == r.finish
        # the double names the worker on every chunk: the record keeps it once
        assert len(r.workers) == 1 and 0 <= r.workers[0] < 4, r.workers
    # open loop: requests were sent at their arrival times, so the last TTFT is as small as the first
    assert max(r.first_token for r in recs) >= specs[-1].arrival


@pytest.mark.parametrize(
    "model, kind",
    [("error-503", "http: 503 no worker available"), ("stream-error", "stream: worker lost"),
     ("drop", "stream:"), ("hang", "timeout:")],
)
def test_client_records_errors(fake, model, kind):
    url, _ = fake
    cfg = ClientConfig(url=url, model=model, request_timeout_s=1.0)
    t = time.monotonic()
    (r,) = asyncio.run(LoadClient(cfg).replay([RequestSpec(0, 0.0, 5, 8)]))
    assert time.monotonic() - t < 10
    assert r.error is not None and r.error.startswith(kind), r.error
    if model in ("stream-error", "drop"):
        assert r.output_tokens == 2 and r.first_token is not None
    if model == "error-503":
        assert r.first_token is None and r.output_tokens == 0


def test_client_connect_error_and_deadline():
    port = free_port()  # nothing listens there
    (r,) = asyncio.run(LoadClient(ClientConfig(url=f"http://127.0.0.1:{port}")).replay([RequestSpec(0, 0.0, 5, 8)]))
    assert r.error.startswith("connect:")


def test_client_replay_deadline_never_hangs(fake):
    url, _ = fake
    specs = [RequestSpec(i, 0.05 * i, 5, 4) for i in range(4)]
    cfg = ClientConfig(url=url, model="hang", request_timeout_s=60.0, max_concurrency=1)
    t = time.monotonic()
    recs = asyncio.run(LoadClient(cfg).replay(specs, deadline_s=1.0))
    assert time.monotonic() - t < 5
    assert all(r.error is not None and r.error.startswith(("timeout:", "cancelled:")) for r in recs)
    assert recs[0].first_token is not None  # it got its first token before hanging


# ---- fault injection -----------------------------------------------------------------------


def test_sigkill_really_kills_the_worker(fake):
    url, _ = fake
    pid = httpx.get(f"{url}/lumen/cluster").json()["workers"][1]["pid"]
    assert _alive(pid)
    t0 = time.monotonic()
    (ev,) = asyncio.run(run_plan(url, [FaultSpec(0.2, 1)], t0))
    assert ev.pid == pid and ev.verified is True and ev.error is None
    assert 0.2 <= ev.injected_s < 1.0
    assert not _alive(pid)


def test_sigstop_then_sigcont(fake):
    url, _ = fake
    pid = httpx.get(f"{url}/lumen/cluster").json()["workers"][2]["pid"]

    async def go():
        task = asyncio.create_task(run_plan(url, [FaultSpec(0.0, 2, signal.SIGSTOP, 0.6)], time.monotonic()))
        await asyncio.sleep(0.3)
        mid = _proc_state(pid)
        events = await task
        return mid, events

    mid, (ev,) = asyncio.run(go())
    assert mid == "T"
    assert ev.cont_s is not None and ev.cont_s >= 0.6
    assert _proc_state(pid) != "T"
    os.kill(pid, signal.SIGCONT)  # belt and braces for the rest of the fixture


def _mock_cluster(workers):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"workers": workers})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x")


@pytest.mark.parametrize(
    "workers, match",
    [
        ([{"id": 1, "pid": 12345, "host": "10.0.0.7", "state": "serving"}], "only signal local workers"),
        ([{"id": 0, "pid": 12345, "host": "127.0.0.1", "state": "serving"}], "no worker 1"),
        ([{"id": 1, "pid": None, "host": "127.0.0.1", "state": "serving"}], "no usable pid"),
    ],
)
def test_inject_refuses_what_it_cannot_do(workers, match):
    async def go():
        async with _mock_cluster(workers) as http:
            await inject(http, FaultSpec(0.0, 1), FaultEvent("x", 0.0), lambda: 0.0)

    with pytest.raises(FaultInjectionError, match=match):
        asyncio.run(go())


# ---- runner + CLI --------------------------------------------------------------------------


def test_run_bench_against_fake_server(tmp_path):
    cfg = BenchConfig(
        workers=4,
        policies=["stop-restart", "lumen"],
        qps=40.0,
        requests=120,
        lengths="fixed:16:8",
        fail=["t=1s:worker=1:SIGKILL"],
        repeats=2,
        window=10,
        # The double's TTFT is ~0.09 s, x4 while degraded; a 50% threshold keeps the test about
        # the pipeline, not about scheduling noise on a loaded 2-core machine.
        threshold=0.5,
        out=str(tmp_path / "out"),
        serve_cmd=[sys.executable, str(FAKE), "--port", "{port}", "--policy", "{policy}", "--workers", "{workers}",
                   "--prefill-per-token", "0.005"],
        startup_timeout_s=60,
        stop_grace_s=3,
        quiet=True,
    )
    res = run_bench(cfg)
    assert [(s.policy, s.seed) for s in res.summaries] == [
        (NO_FAILURE, 0), ("stop-restart", 0), ("lumen", 0), (NO_FAILURE, 1), ("stop-restart", 1), ("lumen", 1)
    ]
    by = {a.policy: a for a in res.aggregates}
    for p in ("stop-restart", "lumen"):
        runs = [s for s in res.summaries if s.policy == p]
        assert all(s.degraded and s.recovered for s in runs), [(s.degraded, s.recovered) for s in runs]
        assert all(s.n_errors == 0 and s.n_interrupted > 0 for s in runs)
        assert all(0.9 < s.failure_times[0] < 1.5 for s in runs)
        assert by[p].metrics["recovery_time_s"].n == 2
    # the double degrades 1.0 s under stop-restart and 0.4 s under lumen
    assert by["stop-restart"].metrics["recovery_time_s"].mean > by["lumen"].metrics["recovery_time_s"].mean
    assert by[NO_FAILURE].metrics["recovery_time_s"].mean == 0.0
    assert [r.unplanned_restarts for r in res.runs] == [0] * 6  # the double restarts only the killed worker
    out = tmp_path / "out"
    for name in ("results.json", "runs.csv", "summary.csv", "ttft_timeline.png", "policies.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 6 and len(doc["meta"]["fault_events"]) == 4
    assert all(e["verified"] for e in doc["meta"]["fault_events"])
    assert len((out / "records" / "lumen-seed1.jsonl").read_text().splitlines()) == 120
    # where the interrupted requests went, from the cluster's recovered_here counters (the double sends
    # every one to the killed worker's ring neighbour: all on one target)
    targets = {r["policy"]: r for r in doc["recovery_targets"]["by_policy"]}
    for p, restored in (("stop-restart", 0.0), ("lumen", 1.0)):
        assert targets[p]["runs"] == 2 and targets[p]["restored_fraction"] == restored
        assert targets[p]["requests"] == sum(s.n_interrupted for s in res.summaries if s.policy == p)
        assert targets[p]["top_request_share"] == 1.0 and targets[p]["mean_targets"] == 1.0
    assert all(r.targets.top_worker == 2 for r in res.runs if r.policy != NO_FAILURE)
    # the workers that served each request (the double's lumen extension): an interrupted one moved from
    # the killed worker 1 to its ring neighbour 2 (or started there, interrupted before its first token)
    for run in res.runs:
        for r in run.records:
            assert r.workers in ([[1, 2], [2]] if r.interrupted else [[0], [1], [2], [3]]), (r.interrupted, r.workers)
    stored = [json.loads(line) for line in (out / "records" / "lumen-seed1.jsonl").read_text().splitlines()]
    assert [d["workers"] for d in stored] == [r.workers for r in res.runs[-1].records]
    # each failure run's figures per worker and phase, in results.json and after the bench table
    for d in doc["runs"]:
        pw = d["per_worker"]
        if d["policy"] == NO_FAILURE:
            assert pw == {}
            continue
        assert pw["phases"] == ["before", "kill..back", "after"] and pw["bounds_s"][0] == d["failure_times"][0]
        assert [(w["worker"], w["failed"]) for w in pw["workers"]] == [(0, False), (1, True), (2, False), (3, False)]
        assert sum(sum(w["n"]) for w in pw["workers"]) == 120
    # no orphans: every killed worker and every fake server is gone
    for e in doc["meta"]["fault_events"]:
        assert not _alive(e["pid"])
    left = subprocess.run(["pgrep", "-f", str(FAKE)], capture_output=True, text=True).stdout.split()
    assert left == [], left


def test_a_runs_end_state_keeps_each_workers_checkpoint_and_restore_counters():
    cluster = {"policy": "lumen", "unprotected_requests": 2, "requests": [{"id": "r"}],
               "workers": [{"id": 0, "epoch": 2, "phases_s": {"warmup_s": 1.0}, "pid": 7,
                            "stats": {"ckpt_rejected_unreserved": 3, "pages_sent": 9, "restored_pages": 4,
                                      "num_running": 5, "slot_overruns": 1, "drop_bad_mac": 0}}]}
    assert runner_mod._cluster_end(cluster) == {
        "policy": "lumen", "unprotected_requests": 2,
        "workers": [{"id": 0, "epoch": 2, "phases_s": {"warmup_s": 1.0},
                     "stats": {"ckpt_rejected_unreserved": 3, "pages_sent": 9, "restored_pages": 4,
                               "num_running": 5, "slot_overruns": 1}}]}
    assert runner_mod._cluster_end(None) is None and runner_mod._epochs(cluster) == {0: 2}


def test_a_runs_end_state_counts_only_its_own_recovery_dispatches():
    # the controller's recovered_here counters are cumulative: an attached cluster serves several runs
    def cluster(restored, recomputed, tokens):
        return {"workers": [{"id": 0, "epoch": 1, "recovered_here": {"restored": 0, "recomputed": 0, "tokens": 0}},
                            {"id": 1, "epoch": 1, "recovered_here": {"restored": restored, "recomputed": recomputed,
                                                                     "tokens": tokens}}]}
    end = runner_mod._cluster_end(cluster(5, 2, 900), before=cluster(3, 1, 500))
    assert [w["recovered_here"] for w in end["workers"]] == [
        {"restored": 0, "recomputed": 0, "tokens": 0}, {"restored": 2, "recomputed": 1, "tokens": 400}]
    t = runner_mod._targets(end)
    assert (t.requests, t.restored, t.top_worker, t.top_request_share, t.top_token_share) == (3, 2, 1, 1.0, 1.0)
    # a cluster without the counters (runs stored before them): no figure rather than a zero
    assert runner_mod._targets(runner_mod._cluster_end({"workers": [{"id": 0}]})) is None


def test_run_bench_calibrates_qps(tmp_path):
    cfg = BenchConfig(
        policies=["lumen"], qps=None, duration=2.0, lengths="fixed:16:8", repeats=1, window=None,
        fail=["t=1s:worker=1"], out=str(tmp_path / "out"), startup_timeout_s=60, stop_grace_s=3, quiet=True,
        serve_cmd=[sys.executable, str(FAKE), "--port", "{port}", "--policy", "{policy}"],
    )
    res = run_bench(cfg)
    cal = res.meta["calibration"]
    assert cal["probe_requests"] == 8 and cal["qps"] == pytest.approx(0.5 * cal["saturated_rps"])
    n = len(res.runs[0].records)
    assert n == math.ceil(2.0 * cal["qps"]) and res.meta["qps"] == cal["qps"]
    assert res.meta["window"] == max(5, n // 12) == res.summaries[1].window
    assert len(res.runs[1].records) == n  # the failure run replays the same calibrated workload


def test_run_bench_resume_reuses_finished_runs(tmp_path):
    """A long experiment split over several invocations: --resume reruns nothing that finished and
    keeps the first invocation's calibrated rate, so every run replays one workload."""
    def cfg(policies, repeats, resume):
        return BenchConfig(
            policies=policies, qps=None, calibration_requests=6, duration=2.0, lengths="fixed:16:8",
            repeats=repeats, window=None, fail=["t=1s:worker=1"], out=str(tmp_path / "out"), resume=resume,
            startup_timeout_s=60, stop_grace_s=3, quiet=True,
            serve_cmd=[sys.executable, str(FAKE), "--port", "{port}", "--policy", "{policy}"],
        )

    first = run_bench(cfg(["lumen"], 1, resume=False))
    assert first.meta["calibration"]["probe_requests"] == 6
    records = tmp_path / "out" / "records"
    stamps = {p.name: p.stat().st_mtime_ns for p in records.iterdir()}
    assert set(stamps) == {f"{NO_FAILURE}-seed0.jsonl", f"{NO_FAILURE}-seed0.run.json",
                           "lumen-seed0.jsonl", "lumen-seed0.run.json"}
    end = json.loads(records.joinpath("lumen-seed0.run.json").read_text())["cluster_end"]
    assert end["policy"] == "lumen" and [w["id"] for w in end["workers"]] == [0, 1, 2, 3]
    second = run_bench(cfg(["lumen", "stop-restart"], 2, resume=True))
    assert [(s.policy, s.seed) for s in second.summaries] == [
        (NO_FAILURE, 0), ("lumen", 0), ("stop-restart", 0), (NO_FAILURE, 1), ("lumen", 1), ("stop-restart", 1)
    ]
    assert {n: records.joinpath(n).stat().st_mtime_ns for n in stamps} == stamps, "a finished run was redone"
    assert second.meta["qps"] == first.meta["qps"]
    reused = second.runs[1]
    assert [r.to_dict() for r in reused.records] == [r.to_dict() for r in first.runs[1].records]
    assert reused.events[0].injected_s == first.runs[1].events[0].injected_s
    assert {len(r.records) for r in second.runs} == {len(first.runs[0].records)}
    # --report-only: the table over what finished (seed 2 never ran), no cluster started
    report = run_bench(dataclasses.replace(cfg(["lumen", "stop-restart", "spec-only"], 3, resume=False),
                                           report_only=True, serve_cmd=["false"]))
    assert [(s.policy, s.seed) for s in report.summaries] == [(s.policy, s.seed) for s in second.summaries]
    assert report.meta["qps"] == first.meta["qps"]
    # resuming at another fixed rate would put two workloads in one table
    with pytest.raises(ValueError, match="mix two workloads"):
        run_bench(dataclasses.replace(cfg(["lumen"], 1, resume=True), qps=2 * first.meta["qps"]))


def test_run_bench_refuses_requests_longer_than_the_context(tmp_path):
    cfg = BenchConfig(
        policies=["lumen"], qps=10.0, requests=5, lengths="fixed:4000:200", repeats=1, window=5,
        out=str(tmp_path / "out"), fail=["t=0.1s:worker=0"], startup_timeout_s=60, stop_grace_s=3, quiet=True,
        serve_cmd=[sys.executable, str(FAKE), "--port", "{port}", "--max-model-len", "2048"],
    )
    with pytest.raises(ValueError, match="--max-prompt"):
        run_bench(cfg)
    left = subprocess.run(["pgrep", "-f", str(FAKE)], capture_output=True, text=True).stdout.split()
    assert left == [], left


_BENCH_SCRIPT = """
import sys
from lumen.bench import BenchConfig, run_bench
run_bench(BenchConfig(policies=["lumen"], qps=2.0, requests=200, lengths="fixed:8:4", fail=["t=50s:worker=0"],
                      repeats=1, window=10, out=sys.argv[2], quiet=True, stop_grace_s=3,
                      serve_cmd=[sys.executable, sys.argv[1], "--port", "{port}"]))
"""


def _fake_pids() -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"{FAKE}|lumen fake worker"], capture_output=True, text=True).stdout
    return out.split()


def _as_a_background_job() -> None:
    # What a child inherits from a non-interactive shell's `cmd &` (SIGINT ignored) or from a parent
    # thread that blocks signals: neither may keep the bench from acting on SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


@pytest.mark.parametrize("sig, inherited", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGKILL, False)])
def test_killing_the_bench_leaves_no_cluster_behind(tmp_path, sig, inherited):
    bench = subprocess.Popen([sys.executable, "-c", _BENCH_SCRIPT, str(FAKE), str(tmp_path / "out")],
                             preexec_fn=_as_a_background_job if inherited else None)
    try:
        deadline = time.monotonic() + 60
        while len(_fake_pids()) < 5:  # the server and its 4 stand-in workers
            assert time.monotonic() < deadline and bench.poll() is None, "the fake cluster never started"
            time.sleep(0.2)
        time.sleep(1.0)
        bench.send_signal(sig)
        try:
            bench.wait(30)
        except subprocess.TimeoutExpired:
            status = Path(f"/proc/{bench.pid}/status").read_text()
            masks = [line for line in status.splitlines() if line.startswith(("State", "Sig", "Shd"))]
            raise AssertionError(f"the bench did not exit after {sig.name}: {masks}") from None
        deadline = time.monotonic() + 20
        while _fake_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _fake_pids() == []
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_unplanned_restarts_are_counted():
    from lumen.bench.runner import _unplanned

    kill1 = FaultEvent("t=1s:worker=1:SIGKILL", 1.0, injected_s=1.0, worker=1)
    assert _unplanned({0: 1, 1: 1}, {0: 1, 1: 2}, [kill1]) == 0
    assert _unplanned({0: 1, 1: 1}, {0: 2, 1: 3}, [kill1]) == 2  # worker 0 and a second restart of 1
    assert _unplanned({0: 1, 1: 1}, {0: 1, 1: 1}, [kill1]) == 0  # not restarted yet by the end
    assert _unplanned({0: 1}, {0: 2}, []) == 1
    assert _unplanned(None, {0: 2}, []) is None


def test_cli_parses_bench_and_demo():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    a = parser.parse_args(["bench", "--policy", "lumen", "--fail", "t=5s:worker=0:SIGSTOP:cont_after=1s",
                           "--fail", "t=9s:worker=2", "--qps", "3", "--duration", "20", "--window", "50",
                           "--serve-args", "--ckpt-budget '1 GiB'"])
    cfg = config_from_args(a)
    assert a.func.__name__ == "run" and not a.bench_demo
    assert cfg.policies == ["lumen"] and len(cfg.fail) == 2 and cfg.n_requests() == 60 and cfg.window == 50
    # --device-share, --slot-ms and --ckpt-replicas go first, so that --serve-args can override them
    assert cfg.serve_args == ["--device-share", "auto", "--slot-ms", "auto", "--ckpt-replicas", "1",
                              "--ckpt-budget", "1 GiB"]
    assert cfg.causal_start
    d = config_from_args(parser.parse_args(["demo"]))
    assert d.policies == DEMO_DEFAULTS["policies"] and d.workers == 4 and d.model == "default"
    assert d.repeats == 1 and d.window is None and d.fail == DEMO_DEFAULTS["fail"]
    assert d.qps is None and d.duration == DEMO_DEFAULTS["duration"]  # calibrated rate, fixed duration
    # time slots where the workers share the CPU, past 3/4 of the capacity: losing one of four builds a backlog
    assert d.serve_args == ["--device-share", "auto", "--slot-ms", "auto", "--ckpt-replicas", "1",
                            "--max-batch", "4"]
    k2 = config_from_args(parser.parse_args(["demo", "--ckpt-replicas", "2", "--domains", "2"]))
    assert k2.serve_args[4:8] == ["--ckpt-replicas", "2", "--domains", "2"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--ckpt-replicas", "none"])
    assert d.target_load == 0.85 > 0.75 and d.reload_delay_s == 15
    auto = config_from_args(parser.parse_args(["bench", "--qps", "auto", "--window", "auto", "--duration", "9"]))
    assert auto.qps is None and auto.window is None and auto.window_for(120) == 10 and auto.window_for(12) == 5
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--qps", "0"])
    assert parser.parse_args(["demo"]).bench_demo
    assert d.failure_free == "reference"
    assert config_from_args(parser.parse_args(["bench", "--failure-free", "all"])).failure_free == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--failure-free", "some"])
    with pytest.raises(ValueError, match="--url"):
        runner_mod._validate(BenchConfig(url="http://127.0.0.1:1", failure_free="all"))


def test_the_outage_ends_when_the_killed_worker_serves_again():
    """The injector's replay time plus the wall-clock gap from its signal to the worker's next SERVING
    (the controller's `serving_at`); unknown where the worker never came back or nobody said."""
    kill = FaultEvent("t=10s:worker=1:SIGKILL", 10.0, injected_s=10.2, injected_wall=5000.0, worker=1,
                      signal="SIGKILL")
    back = {"workers": [{"id": 0, "phases_s": {"serving_at": 4990.0}},
                        {"id": 1, "phases_s": {"restart_at": 5000.1, "serving_at": 5020.0}}]}
    assert runner_mod.outage_end([kill], back) == pytest.approx(30.2)
    stale = {"workers": [{"id": 1, "phases_s": {"serving_at": 4990.0}}]}  # its first start: not back yet
    assert runner_mod.outage_end([kill], stale) is None and runner_mod.outage_end([kill], None) is None
    stop = dataclasses.replace(kill, signal="SIGSTOP")
    assert runner_mod.outage_end([stop], back) is None and runner_mod.outage_end([], back) is None
    # two kills: the outage lasts until the later return
    kill0 = dataclasses.replace(kill, worker=0, injected_s=11.2, injected_wall=5001.0)
    both = {"workers": [{"id": 0, "phases_s": {"serving_at": 5030.0}}, back["workers"][1]]}
    assert runner_mod.outage_end([kill, kill0], both) == pytest.approx(40.2)


def test_the_bench_flags_seeds_whose_failure_cost_no_capacity(tmp_path):
    """Stored runs, reported with --report-only (no cluster): in seed 0 stop-restart's requests that
    arrived while the killed worker was gone were as fast as without the failure (the survivors
    absorbed its share, as workers sharing one device do), in seed 1 three times slower. The bench
    warns after the table, names seed 0, and records it in results.json and runs.csv (DESIGN.md §5)."""
    import io

    from lumen.metrics import RequestRecord
    from lumen.metrics.report import report_console

    out = tmp_path / "out"
    kill = FaultEvent("t=1s:worker=1:SIGKILL", 1.0, injected_s=1.0, injected_wall=1000.0, worker=1,
                      signal="SIGKILL", verified=True)

    def records(slow_in_outage: float) -> list[RequestRecord]:
        recs = []
        for i in range(60):
            a = i * 0.1
            t = 0.1 * (slow_in_outage if 1.0 <= a < 3.0 else 1.0)
            recs.append(RequestRecord(i, a, a + t, a + t + 0.7, 16, 8))
        return recs

    for seed, slow in ((0, 1.0), (1, 3.0)):
        for label, recs, events in ((NO_FAILURE, records(1.0), []), ("stop-restart", records(slow), [kill]),
                                    ("lumen", records(1.0 + (slow - 1.0) / 4), [kill])):
            runner_mod._save_records(out / "records" / f"{label}-seed{seed}.jsonl", recs)
            runner_mod._save_run_meta(out, label, seed, events, 0, None, 3.0 if events else None)
    cfg = BenchConfig(policies=["stop-restart", "lumen"], qps=10.0, requests=60, repeats=2, window=10,
                      fail=["t=1s:worker=1:SIGKILL"], out=str(out), report_only=True, serve_cmd=["false"],
                      quiet=True)
    console = report_console(file=io.StringIO())
    res = run_bench(cfg, console)
    text = console.file.getvalue()
    assert "outage TTFT ×" in text and "…" not in text  # the table is whole in a non-terminal
    warning = next(line for line in text.splitlines() if line.startswith("WARNING"))
    assert "the failure cost no capacity in seed 0 (outage TTFT × stop-restart 1.00)" in warning
    assert "seed 1" not in text.split("WARNING", 1)[1].split("results in", 1)[0]
    assert text.index("WARNING") > text.index("outage TTFT ×")  # after the table
    assert res.capacity["no_capacity_loss_seeds"] == [0]
    assert [(s.policy, s.seed, s.capacity_lost) for s in res.summaries] == [
        (NO_FAILURE, 0, None), ("stop-restart", 0, False), ("lumen", 0, False),
        (NO_FAILURE, 1, None), ("stop-restart", 1, True), ("lumen", 1, True)]
    doc = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["seed"]) for r in doc["no_capacity_loss_runs"]] == [("stop-restart", 0), ("lumen", 0)]
    assert doc["no_capacity_loss_runs"][0]["outage_ttft_vs_baseline"] == pytest.approx(1.0)
    check = doc["capacity_check"]
    assert check["reference_policy"] == "stop-restart" and check["unchecked_seeds"] == []
    assert check["seeds"][1]["outage_ttft_vs_baseline"]["stop-restart"] == pytest.approx(3.0)
    assert [r["capacity_lost"] for r in doc["runs"]] == [None, False, False, None, True, True]
    assert "capacity_lost" in (out / "runs.csv").read_text().splitlines()[0]


def test_each_policys_failure_free_run_gives_its_cost_where_nothing_fails(tmp_path):
    """--failure-free all: beside the reference (stop-restart without a failure) each policy runs the same
    workload without one; the bench reports its TTFT and TPOT over the reference's, per seed and as a
    mean ± CI, in a table of its own and in results.json. Those runs are not failure runs: they judge no
    capacity, start no recovery figure and stay out of the main table and the plots. Stored runs,
    reported with --report-only (no cluster)."""
    import io

    from lumen.metrics import RequestRecord
    from lumen.metrics.report import report_console
    from lumen.metrics.summary import failure_free_label

    out = tmp_path / "out"
    kill = FaultEvent("t=1s:worker=1:SIGKILL", 1.0, injected_s=1.0, injected_wall=1000.0, worker=1,
                      signal="SIGKILL", verified=True)

    def records(ttft_s: float, tpot_s: float, slow_in_outage: float = 1.0) -> list[RequestRecord]:
        recs = []
        for i in range(60):
            a = i * 0.1
            t = ttft_s * (slow_in_outage if 1.0 <= a < 3.0 else 1.0)
            recs.append(RequestRecord(i, a, a + t, a + t + 7 * tpot_s, 16, 8))
        return recs

    lumen_cost = {0: (1.10, 1.02), 1: (1.30, 1.04)}  # TTFT and TPOT over the reference's, per seed
    for seed in (0, 1):
        stored = [(NO_FAILURE, records(0.1, 0.1), []), ("stop-restart", records(0.1, 0.1, 3.0), [kill]),
                  ("lumen", records(0.1, 0.1, 2.0), [kill]),
                  (failure_free_label("lumen"), records(0.1 * lumen_cost[seed][0], 0.1 * lumen_cost[seed][1]), [])]
        for label, recs, events in stored:
            runner_mod._save_records(out / "records" / f"{label}-seed{seed}.jsonl", recs)
            runner_mod._save_run_meta(out, label, seed, events, 0, None, 3.0 if events else None)
    cfg = BenchConfig(policies=["stop-restart", "lumen"], qps=10.0, requests=60, repeats=2, window=10,
                      fail=["t=1s:worker=1:SIGKILL"], out=str(out), report_only=True, serve_cmd=["false"],
                      quiet=True, failure_free="all")
    console = report_console(file=io.StringIO())
    res = run_bench(cfg, console)
    assert [(s.policy, s.seed) for s in res.summaries] == [
        (NO_FAILURE, 0), ("stop-restart", 0), ("lumen", 0), ("no-failure-lumen", 0),
        (NO_FAILURE, 1), ("stop-restart", 1), ("lumen", 1), ("no-failure-lumen", 1)]
    doc = json.loads((out / "results.json").read_text())
    (row,) = doc["failure_free_overhead"]
    assert row["policy"] == "lumen" and row["seeds"] == [0, 1]
    assert row["ttft_mean_vs_reference"]["mean"] == pytest.approx(1.20)
    assert row["ttft_mean_vs_reference"]["ci95"] == pytest.approx(12.706 * 0.1, rel=1e-3)  # t(0.975, 1) x s/sqrt(2)
    assert row["tpot_mean_vs_reference"]["mean"] == pytest.approx(1.03)
    # no capacity is judged from a run without a failure, and the failure runs lost capacity
    assert doc["capacity_check"]["unchecked_seeds"] == [] and res.capacity["no_capacity_loss_seeds"] == []
    assert [s.capacity_lost for s in res.summaries if s.policy == "no-failure-lumen"] == [None, None]
    text = console.file.getvalue()
    table, _, rest = text.partition("no failure: each policy over stop-restart")
    assert "no-failure-lumen" not in table  # the main table: failure runs and their reference
    assert "lumen" in rest and "1.200 ± 1.271" in rest and "1.030 ± 0.127" in rest


def test_a_seed_resumed_on_another_machine_is_flagged(tmp_path):
    """Runs record the machine (boot) they ran on; a seed whose runs came from two is named, a seed run
    whole on one is not, and a run from before machines were recorded counts as unknown."""
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "lumen-seed0.jsonl").write_text("")
    runner_mod._save_run_meta(tmp_path, "lumen", 0, [], 0)
    here = runner_mod._load_run(tmp_path, "lumen", 0)
    assert here is not None and here.host == runner_mod.host_identity()
    other = {"node": here.host["node"], "boot_id": "another-boot"}
    runs = [dataclasses.replace(here, policy=NO_FAILURE), here,
            dataclasses.replace(here, seed=1, policy=NO_FAILURE, host=other), dataclasses.replace(here, seed=1),
            dataclasses.replace(here, seed=2, policy=NO_FAILURE, host=None), dataclasses.replace(here, seed=2)]
    mixed = runner_mod.seeds_mixing_hosts(runs)
    assert set(mixed) == {1, 2}
    assert mixed[1][NO_FAILURE] == "another-boot" and mixed[2][NO_FAILURE] == "unknown"
