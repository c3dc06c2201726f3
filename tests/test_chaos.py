"""`lumen chaos`: the fault planner's rules, and a short seeded chaos run against a live cluster.

The live run is the CI version of the soak in docs/reliability.md: 4 real worker processes (tiny
model, float64 deterministic mode, the target itself as draft so that assisted recovery happens),
open-loop load, SIGKILL/SIGSTOP faults of every kind the planner knows, client abuse alongside. It
must lose nothing, change no output, leave nothing behind and leave no process running.
"""

from __future__ import annotations

import random

import pytest
from cluster_util import make_tiny_model_dir, worker_pids_alive

from lumen.bench.chaos import FAULT_KINDS, ChaosConfig, FaultPlanner, classify_outcome, run_chaos
from lumen.metrics import RequestRecord
from lumen.workload import RequestSpec


def _cluster(states: list[str], running: dict[int, int] | None = None, holders: dict[int, int] | None = None,
             partners: dict[int, int] | None = None) -> dict:
    workers = [{"id": i, "state": s, "alive": s != "down", "pid": 1000 + i, "epoch": 1,
                "partner": (partners or {}).get(i)} for i, s in enumerate(states)]
    requests = [{"executor": ex, "holder": (holders or {}).get(ex)} for ex, n in (running or {}).items()
                for _ in range(n)]
    return {"workers": workers, "requests": requests}


@pytest.mark.parametrize("seed", range(30))
def test_planner_always_leaves_a_serving_worker_untouched(seed):
    rng = random.Random(seed)
    planner = FaultPlanner(FAULT_KINDS, seed)
    for _ in range(40):
        n = rng.randint(2, 6)
        states = [rng.choice(["serving", "serving", "down", "loading_draft", "assisting"]) for _ in range(n)]
        planner.stopped = {i for i in range(n) if rng.random() < 0.2}
        running = {i: rng.randint(0, 3) for i in range(n) if states[i] == "serving"}
        holders = {i: rng.randrange(n) for i in running}
        partners = {i: rng.randrange(n) for i in range(n) if states[i] == "assisting"}
        c = _cluster(states, running, holders, partners)
        choice = planner.choose(c)
        untouched_before = [i for i, s in enumerate(states) if s == "serving" and i not in planner.stopped]
        if choice is None:
            continue
        kind, victims = choice
        assert kind in FAULT_KINDS and victims and len(set(victims)) == len(victims)
        assert not set(victims) & planner.stopped
        assert set(untouched_before) - set(victims), (states, planner.stopped, choice)


def test_planner_cycles_through_every_kind_and_targets_the_named_roles():
    planner = FaultPlanner(FAULT_KINDS, 0)
    # worker 0 executes 3 requests checkpointed on 1; worker 3 recovers, assisting worker 2
    c = _cluster(["serving", "serving", "serving", "assisting"], running={0: 3, 2: 1}, holders={0: 1, 2: 0},
                 partners={3: 2})
    seen = {}
    for _ in range(len(FAULT_KINDS)):
        kind, victims = planner.choose(c)
        seen[kind] = victims
    assert set(seen) == set(FAULT_KINDS)
    assert all(planner.choose(c)[0] != "kill-recovering" for _ in range(10))  # once per recovery
    c["workers"][3]["state"] = "serving"
    planner.choose(c)
    assert planner.hit_recovering == set()
    assert seen["kill-executor"] == [0] and seen["kill-restoring"] == [0]
    assert seen["kill-holder"] == [1]
    assert seen["kill-executor-and-holder"] == [0, 1]
    assert seen["kill-recovering"] == [3]
    assert seen["kill-partner"] == [2]
    assert len(seen["kill-many"]) == 2
    with pytest.raises(ValueError):
        FaultPlanner(("kill-everything",), 0)


def test_planner_spares_the_last_untouched_serving_worker():
    planner = FaultPlanner(FAULT_KINDS, 0)
    planner.stopped = {1}  # worker 1 hangs: worker 0 is the only one left, whatever it runs
    assert planner.choose(_cluster(["serving", "serving"], running={0: 2})) is None
    # a recovering worker may still be hit: that leaves worker 0 alone
    assert planner.choose(_cluster(["serving", "serving", "loading_draft"], running={0: 2})) == ("kill-recovering", [2])


def test_planner_keeps_min_serving_workers_untouched():
    planner = FaultPlanner(FAULT_KINDS, 3, min_serving=2)
    c = _cluster(["serving", "serving", "serving", "loading_draft"], running={0: 2, 1: 1}, holders={0: 1})
    for _ in range(20):
        kind, victims = planner.choose(c)
        assert kind != "kill-many"  # two of three serving would leave one
        assert sum(1 for i in range(3) if i not in victims) >= 2
    assert FaultPlanner(FAULT_KINDS, 0, min_serving=3).choose(_cluster(["serving"] * 3, running={0: 1})) is None


def test_outcomes_are_classified_by_who_said_what():
    spec = RequestSpec(0, 0.0, 10, 8)

    def rec(error=None, out=8):
        return RequestRecord(0, 0.0, 0.1, 0.2, 10, out, error=error)

    assert classify_outcome(rec(), spec) == "completed"
    assert classify_outcome(rec(out=5), spec) == "lost"  # finished short without saying why
    assert classify_outcome(rec("http: 503 no worker available"), spec) == "failed"
    assert classify_outcome(rec("stream: request aborted by the server"), spec) == "failed"
    assert classify_outcome(rec("stream: RemoteProtocolError: peer closed connection"), spec) == "lost"
    assert classify_outcome(rec("stream: ended without a finish_reason"), spec) == "lost"
    assert classify_outcome(rec("timeout: no completion within 60s"), spec) == "lost"


@pytest.mark.cluster
def test_short_chaos_run_loses_nothing(tmp_path, monkeypatch):
    model = str(make_tiny_model_dir(tmp_path / "tiny"))
    # a reload that takes a few seconds keeps workers recovering (and assisting) long enough to be hit
    monkeypatch.setenv("LUMEN_FAULT_SLOW_RELOAD_S", "3")
    cfg = ChaosConfig(model=model, workers=4, policy="lumen", duration=25.0, qps=3.0, max_prompt=64, max_output=48,
                      fault_every=2.5, seed=15, idle_connections=16,
                      # two copies per request: kill-executor-and-holder restores from the second
                      serve_args=["--draft-model", model, "--ckpt-replicas", "2"],
                      out=str(tmp_path / "chaos"), quiet=True, startup_timeout_s=300.0,
                      replay_sample=30)  # a seeded sample of the ~75 completed, replayed one at a time
    report = run_chaos(cfg)
    s = report.summary
    assert report.passed, report.problems
    assert s["requests"]["lost"] == 0 and s["requests"]["completed"] + s["requests"]["failed"] == s["requests"]["sent"]
    assert s["outputs"]["checked"] and s["outputs"]["differ"] == 0 and s["outputs"]["compared"] > 0
    kinds = s["faults"]["by_kind"]
    # which kinds find a target depends on the cluster's state at the time. Seed 15 shuffles the kinds
    # to hang, kill-executor-and-holder, ... : the first fault is a hang (a serving worker is always
    # there to stop); the executor and first holder of a request usually die together next (4 of 5
    # runs here, 2026-12-07: it needs a request with both copies while two workers stay untouched)
    serving_kills = {"kill-executor", "kill-holder", "kill-executor-and-holder", "kill-restoring", "kill-partner",
                     "kill-many"}
    assert s["faults"]["injected"] >= 4 and kinds.get("hang") and serving_kills & set(kinds), kinds
    assert s["recoveries"] >= 3 and s["detection_s"]["n"] >= 3 and s["recovery_s"]["n"] >= 1
    assert s["abuse"]["disconnected_mid_stream"] > 0 and s["abuse"]["idle_connections"] == 16
    assert report.files["json"].is_file() and report.files["png"].stat().st_size > 0
    # every worker process the run saw is gone with the cluster
    pids = [p["pid"] for p in {**s["processes"]["start"], **s["processes"]["end"]}.values() if p]
    assert not worker_pids_alive(pids)
