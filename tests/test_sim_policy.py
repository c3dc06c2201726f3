"""The simulator decides nothing itself: every decision is a lumen.policy call, and the
simulator's live ClusterTable gives the same decisions as frozen WorkerView snapshots."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lumen.policy as P
import lumen.sim.core as core
from lumen.sim import FailurePlan, FailureSpec, FittedCost, SimConfig, Simulator
from lumen.workload import make_workload

DECISIONS = ("route_new", "place_checkpoint", "dispatch_interrupted", "pick_partner", "next_state",
             "checkpoint_reservation", "pick_partner_by_gain", "choose_spec_lengths", "pairing_gain",
             "draft_phase_pays")
CFG = SimConfig(workers=6, cost=FittedCost((0.004, 2e-5, 1e-4, 1e-7, 1e-9)), kv_tokens=10**6,
                restart_s=0.5, ckpt_budget_gb=40.0, nodes=3)
PLAN = FailurePlan((FailureSpec(2.0, count=2), FailureSpec(3.0, workers=(5,))), mtbf_s=15.0)


def _workload():
    return make_workload(400, 40.0, "sharegpt", seed=11)


def _snapshot(sim: Simulator) -> P.ClusterView:
    ws = tuple(P.WorkerView(w.id, w.state, w.epoch, w.alive, w.waiting, w.running, w.q_wait_s,
                            w.ckpt_reserved_bytes, w.ckpt_budget_bytes, w.h2d_bytes_per_s, w.node,
                            w.partner) for w in sim.workers)
    return P.ClusterView(ws, sim.cfg.lam)


@pytest.mark.parametrize("rule", ["goodput", "fixed"])
def test_every_decision_is_a_policy_call_and_matches_a_frozen_snapshot(monkeypatch, rule):
    sim = Simulator(CFG.with_(spec_rule=rule), _workload(), "lumen", PLAN, seed=3)
    calls: dict[str, int] = {}
    originals = {name: getattr(P, name) for name in DECISIONS}

    def spy(name):
        orig = originals[name]

        def wrapper(*args, **kw):
            calls[name] = calls.get(name, 0) + 1
            out = orig(*args, **kw)
            if args and isinstance(args[0], P.ClusterView):
                # same call on a frozen snapshot of the simulator's worker objects
                assert args[0] is sim.view
                assert orig(_snapshot(sim), *args[1:], **kw) == out, name
            return out
        return wrapper

    for name in DECISIONS:
        monkeypatch.setattr(P, name, spy(name))
    res = sim.run()
    st = res.stats
    assert calls == st.policy_calls
    assert calls["route_new"] == 400 + 0          # one per arrival (none parked: 4+ workers live)
    assert calls["place_checkpoint"] == st.placed + st.unprotected > 0
    assert calls["dispatch_interrupted"] >= 2 and st.restores > 0 and st.shed >= 0
    if rule == "fixed":
        assert calls["pick_partner"] >= 1 and st.assisted_steps > 0
        assert not {"pick_partner_by_gain", "choose_spec_lengths", "pairing_gain"} & set(calls)
    else:
        # pairing by gain, K per request per epoch of an assisted partner, and no fixed pairing
        assert calls["pick_partner_by_gain"] >= 1 and calls["pairing_gain"] >= 1 and "pick_partner" not in calls
        assert calls["choose_spec_lengths"] >= 1 and st.assisted_steps > 0
    assert calls["next_state"] >= st.failures - 2   # FAIL, RESTART, ... (the run ends when the requests do)
    assert all(r.finish is not None for r in res.records)


def test_replacing_a_policy_function_changes_the_simulation(monkeypatch):
    seen_exec = set()
    orig_place = P.place_checkpoint

    def route_lowest(view, **kw):
        c = view.columns
        elig = c.eligible()
        return int(c.ids[elig.argmax()]) if elig.any() else None

    def place_spy(view, policy, executor, s):
        seen_exec.add(executor)
        return orig_place(view, policy, executor, s)

    monkeypatch.setattr(P, "route_new", route_lowest)
    monkeypatch.setattr(P, "place_checkpoint", place_spy)
    res = Simulator(CFG, _workload(), "lumen-no-spec").run()
    assert seen_exec == {0}                      # the router decides where requests run
    assert res.stats.placed > 0


def test_holder_choice_follows_the_policy_and_differs_by_policy():
    # under fixed-ckpt, the holder of every request is the executor's ring neighbour
    sim = Simulator(CFG.with_(nodes=None), _workload(), "fixed-ckpt")
    holders = []
    orig = sim._protect

    def record(w, r, t):
        orig(w, r, t)
        if r.holder is not None:
            holders.append((w.id, r.holder))
    sim._protect = record
    sim.run()
    assert holders and all(h == (e + 1) % CFG.workers for e, h in holders)


def test_sim_source_has_no_decision_logic_of_its_own():
    """Static check: the simulator never imports policy internals (placement/dispatch/pairing)
    and reaches decisions only through the module object P."""
    tree = ast.parse(Path(core.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lumen.policy."):
            raise AssertionError(f"imports {node.module}")
        if isinstance(node, ast.ImportFrom) and node.module == "lumen.policy":
            assert {a.name for a in node.names} <= {"WorkerEvent", "WorkerState"}
