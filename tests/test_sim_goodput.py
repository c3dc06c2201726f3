"""The simulator under the goodput rule of mechanism 3 (issue 24): K per request per step, pairing by
gain and the draft that never delays the target, each decided by `lumen.policy` (through the module
object the simulator calls)."""

from __future__ import annotations

import statistics

import pytest

import lumen.policy as P
from lumen.metrics import summarize_run
from lumen.policy import WorkerEvent as E
from lumen.policy import WorkerState as S
from lumen.sim import FailurePlan, FailureSpec, FittedCost, SimConfig, Simulator, simulate
from lumen.sim.cli import add_arguments, config_from_args
from lumen.workload import make_workload

# 2 x Qwen3-8B on one H100 each: an 8 s target reload from the SSD, the 0.6B draft copied in 0.05 s
LIGHT = SimConfig(workers=2, model="qwen3-8b", device="h100", tp=1, restart_s=0.5)
FAIL1 = FailurePlan((FailureSpec(5.0, workers=(1,)),))


def _light_workload():
    return make_workload(120, 3.0, "sharegpt", seed=2)


def _run(cfg, wl, policy, plan, seed=0):
    """Run, recording (time, worker, event) of every state transition."""
    sim = Simulator(cfg, wl, policy, plan, seed)
    log: list[tuple[float, int, E]] = []
    orig = sim._transition

    def transition(w, ev):
        log.append((sim.now, w.id, ev))
        orig(w, ev)
    sim._transition = transition
    return sim, sim.run(), log


def test_the_partner_asks_the_policy_for_k_each_epoch_while_assisted(monkeypatch):
    seen = []
    orig = P.choose_spec_lengths

    def spy(acceptance, load, step_time, k_max):
        ks = orig(acceptance, load, step_time, k_max)
        # asked for an assisted partner: a serving worker whose partner is ASSISTING
        partners = [w for w in sim.workers if w.state is S.SERVING and w.partner is not None]
        assert partners and all(sim.workers[w.partner].state is S.ASSISTING for w in partners)
        w = next(w for w in partners if len(w.heap) == load.decoding)
        assert load.context_tokens == pytest.approx(w.S_dec + len(w.heap) * w.G)
        room = max(0, LIGHT.max_batch - w.running)
        could_run = (sum(r.pf_total - r.pf_done for r in w.prefilling)
                     + sum(r.pf_total - r.pf_done for r in list(w.wq)[:room]))
        assert load.queued_prefill_tokens == could_run <= w.pending_pf and load.chunk_tokens == LIGHT.chunk_tokens
        assert acceptance == [LIGHT.alpha] * load.decoding and k_max == LIGHT.k
        seen.append(ks)
        return ks

    monkeypatch.setattr(P, "choose_spec_lengths", spy)
    sim = Simulator(LIGHT, _light_workload(), "lumen", FAIL1, 0)
    st = sim.run().stats
    assert seen and st.policy_calls["choose_spec_lengths"] == len(seen)
    assert st.assisted_steps > 0 and st.verify_positions > 0
    # the stats count what the policy chose: a K histogram per request-iteration
    assert sum(k * c for k, c in enumerate(st.spec_k_hist)) == st.verify_positions

    # the policy decides: one that never speculates leaves nothing verified
    monkeypatch.setattr(P, "choose_spec_lengths", lambda acc, load, step, k: [0] * len(acc))
    st = simulate(LIGHT, _light_workload(), "lumen", FAIL1, 0).stats
    assert st.verify_positions == 0 and st.assisted_steps == 0 and st.spec_idle_steps > 0


def test_a_full_batch_counts_no_queued_prefill_as_the_live_engine_does():
    """The partner's load as `Engine.load_summary` reports it live: prompt tokens of queued requests that
    the batch has no room for take no budget from verify positions (they cannot run this step)."""
    from collections import deque
    from types import SimpleNamespace

    sim = Simulator(LIGHT.with_(max_batch=2), _light_workload(), "lumen", FAIL1, 0)
    w = sim.workers[0]
    w.wq = deque([SimpleNamespace(pf_total=300, pf_done=0), SimpleNamespace(pf_total=200, pf_done=50)])
    w.prefilling = [SimpleNamespace(pf_total=100, pf_done=40)]
    w.running, w.waiting = 2, 2
    assert sim._load(w).queued_prefill_tokens == 60          # full: the running prefill's remainder only
    w.running = 1
    assert sim._load(w).queued_prefill_tokens == 60 + 300    # room for one: the queue's head joins
    assert sim._load(w).queued_requests == 2 + 1


def test_zero_acceptance_verifies_nothing_and_matches_lumen_no_spec():
    cfg = SimConfig(workers=4, cost=FittedCost((0.004, 2e-5, 1e-4, 1e-7, 1e-9)), kv_tokens=10**6, restart_s=1.0,
                    alpha=0.0)
    wl = make_workload(800, 60.0, "splitwise-conv", seed=5)
    plan = FailurePlan((FailureSpec(4.0, workers=(2,)),))
    base = simulate(cfg, wl, "stop-restart", None, 1)
    out = {}
    for pol in ("lumen", "lumen-no-spec"):
        res = simulate(cfg, wl, pol, plan, 1)
        out[pol] = summarize_run(res.records, base.records, policy=pol, seed=1, failure_times=res.failure_times)
        if pol == "lumen":
            st = res.stats
            assert st.verify_positions == 0 and st.assisted_steps == 0
            assert st.policy_calls["pick_partner_by_gain"] >= 1       # asked, nobody gains: never paired
    assert out["lumen"].affected_ttft_mean == pytest.approx(out["lumen-no-spec"].affected_ttft_mean, rel=1e-6)
    assert out["lumen"].affected_tpot_mean == pytest.approx(out["lumen-no-spec"].affected_tpot_mean, rel=1e-6)


def test_light_load_lowers_the_partners_tpot():
    wl = _light_workload()
    tpot = {}
    for pol in ("lumen", "lumen-no-spec"):
        sim, res, _ = _run(LIGHT, wl, pol, FAIL1)
        # the survivor's requests that arrived while worker 1 was away
        reqs = [r for r in sim.reqs if r.worker == 0 and 5.0 <= r.arrival <= 12.0 and r.output > 1]
        assert len(reqs) >= 10
        tpot[pol] = statistics.mean((r.finish - r.first_token) / (r.output - 1) for r in reqs)
    assert tpot["lumen"] < 0.8 * tpot["lumen-no-spec"], tpot


def test_a_resident_draft_does_not_delay_the_target():
    wl = _light_workload()
    back = {}
    for pol in ("lumen", "lumen-no-spec"):
        _, _, log = _run(LIGHT, wl, pol, FAIL1)
        back[pol] = next(t for t, wid, ev in log if wid == 1 and ev is E.READY)
        events = [ev for t, wid, ev in log if wid == 1]
        assert events[1] == (E.RESTART if pol == "lumen" else E.RESTART_PLAIN)
    h2d = LIGHT.draft_shape.weight_bytes / (LIGHT.h2d_gbps * 1e9 * LIGHT.tp)
    assert back["lumen"] <= back["lumen-no-spec"] + h2d + 1e-9
    # the fixed rule (draft read from the SSD first) came back a draft read later
    _, _, log = _run(LIGHT.with_(spec_rule="fixed"), wl, "lumen", FAIL1)
    fixed = next(t for t, wid, ev in log if wid == 1 and ev is E.READY)
    disk = LIGHT.draft_shape.weight_bytes / (LIGHT.disk_gbps * 1e9)
    assert fixed == pytest.approx(back["lumen-no-spec"] + disk)


def test_a_cold_draft_is_read_first_only_where_it_pays(monkeypatch):
    cold = LIGHT.with_(draft_cached=False)
    asked = []

    def pays(value):
        def f(draft_s, target_s, gain, displaced):
            asked.append((draft_s, target_s, gain, displaced))
            return value
        return f

    for value, first in ((True, E.RESTART), (False, E.RESTART_PLAIN)):
        asked.clear()
        monkeypatch.setattr(P, "draft_phase_pays", pays(value))
        _, res, log = _run(cold, _light_workload(), "lumen", FAIL1)
        assert [ev for _, wid, ev in log if wid == 1][1] == first
        (draft_s, target_s, gain, displaced), = asked
        assert draft_s == pytest.approx(LIGHT.draft_shape.weight_bytes / 2e9)
        assert target_s == pytest.approx(LIGHT.shape.weight_bytes / 2e9)
        assert gain > 0 and displaced > 0
        assert res.stats.draft_skipped == (0 if value else 1)
    monkeypatch.undo()
    # the real rule, at light load: the assistance over the target's 8 s read outweighs a 0.6 s draft read
    _, res, log = _run(cold, _light_workload(), "lumen", FAIL1)
    assert [ev for _, wid, ev in log if wid == 1][1] is E.RESTART and res.stats.assisted_steps > 0


def test_pairing_moves_when_the_policy_names_another_partner(monkeypatch):
    cfg = SimConfig(workers=4, model="qwen3-8b", device="h100", tp=1, restart_s=0.5)
    wl = make_workload(400, 12.0, "sharegpt", seed=3)
    plan = FailurePlan((FailureSpec(5.0, workers=(3,)),))
    calls = []

    def rotate(view, recovering_id, gains, current=None, paired_for_s=None):
        calls.append(current)
        free = sorted(gains)
        return free[len(calls) % len(free)] if free else None

    monkeypatch.setattr(P, "pick_partner_by_gain", rotate)
    sim, res, log = _run(cfg, wl, "lumen", plan)
    assert calls[0] is None and any(c is not None for c in calls)      # paired, then re-evaluated with current=
    assert res.stats.pair_moves >= 2
    # each move: UNPAIRED then PAIRED, and the state machine stayed legal throughout
    evs = [ev for _, wid, ev in log if wid == 3]
    assert evs.count(E.UNPAIRED) == res.stats.pair_moves and evs.count(E.PAIRED) == res.stats.pair_moves + 1
    assert evs[-1] is E.READY and all(r.finish is not None for r in res.records)
    # re-evaluated about once per pair_interval_s while the draft assists (~8 s here)
    assert 5 <= len(calls) <= 12


def test_deterministic_for_a_seed():
    cfg = SimConfig(workers=4, cost=FittedCost((0.004, 2e-5, 1e-4, 1e-7, 1e-9)), kv_tokens=10**6, restart_s=1.0)
    wl = make_workload(400, 40.0, "splitwise-conv", seed=9)
    plan = FailurePlan((FailureSpec(3.0, count=2),), mtbf_s=20.0)
    a = simulate(cfg, wl, "lumen", plan, seed=4)
    b = simulate(cfg, wl, "lumen", plan, seed=4)
    assert a.stats.assisted_steps > 0
    assert [r.to_dict() for r in a.records] == [r.to_dict() for r in b.records]
    sa, sb = a.stats, b.stats
    assert (sa.spec_k_hist, sa.verify_positions, sa.pair_moves, sa.policy_calls) == \
        (sb.spec_k_hist, sb.verify_positions, sb.pair_moves, sb.policy_calls)


def test_config_and_cli_select_the_rule():
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args([]))
    assert cfg.spec_rule == "goodput" and cfg.draft_cached is None and cfg.draft_resident
    cfg = config_from_args(p.parse_args(["--spec-rule", "fixed"]))
    assert cfg.spec_rule == "fixed" and not cfg.draft_resident
    assert config_from_args(p.parse_args(["--spec-rule", "fixed", "--draft-cached"])).draft_resident
    assert not config_from_args(p.parse_args(["--no-draft-cached"])).draft_resident
    with pytest.raises(ValueError, match="spec_rule"):
        SimConfig(spec_rule="greedy")
