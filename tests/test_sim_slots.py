"""Time-division device shares in the simulator (issue 23): workers that share a device step only in
their own slot of `lumen.policy.slots.SlotSchedule`, so each runs at 1/N of the device and losing one
costs 1/N; "shared" is the co-located slowdown model, where survivors speed up."""

from __future__ import annotations

import pytest

from lumen.cli import main as lumen_main
from lumen.policy.slots import LONG_STEP_START_FRACTION, default_slot_s
from lumen.sim import FailurePlan, FailureSpec, FittedCost, SimConfig, Simulator, simulate
from lumen.sim.config import SLOT_REF_BATCH, SLOT_REF_CONTEXT
from lumen.workload import RequestSpec, make_workload

CONST = FittedCost((0.01, 0.0, 0.0, 0.0, 0.0))          # every step 10 ms
CTX = FittedCost((0.004, 2e-5, 1e-4, 1e-7, 1e-9))      # depends on every feature
PER_TOKEN = FittedCost((0.0, 0.001, 0.001, 0.0, 0.0))   # 1 ms per position: a device does 1,000 tokens/s
TOL = 1e-9


def cfg(**kw) -> SimConfig:
    base = dict(workers=4, cost=CONST, kv_tokens=10**6, restart_s=1.0, detect_s=0.3)
    base.update(kw)
    return SimConfig(**base)


class LoggedSim(Simulator):
    """Logs every engine iteration the simulator applies: (worker, start, step time, positions)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log: list[tuple[int, float, float, int]] = []

    def _apply(self, w, n, t):
        for i in range(n):
            self.log.append((w.id, self._iter_start(w, i, w.ep_dt), w.ep_dt, w.ep_p + w.ep_dpos))
        super()._apply(w, n, t)


def _rate(log, wid: int, t0: float, t1: float) -> float:
    """Positions per second of worker wid in [t0, t1), each iteration's counted pro rata of its time
    in the window."""
    return sum(tok * max(0.0, min(s + dt, t1) - max(s, t0)) / dt
               for w, s, dt, tok in log if w == wid and s < t1 and s + dt > t0) / (t1 - t0)


def _check_in_own_slots(sim: LoggedSim) -> int:
    long_steps = 0
    for wid, start, dt, _ in sim.log:
        sched = sim.workers[wid].slot
        assert sched is not None
        ws, we = sched.window(start - TOL)
        assert ws <= start + TOL and we - ws == pytest.approx(sched.slot_s), (wid, start)
        if start + dt > we + TOL:                                 # does not fit what is left of the slot:
            long_steps += 1                                       # it starts near the slot's beginning
            assert start - ws <= LONG_STEP_START_FRACTION * sched.slot_s + TOL, (wid, start, dt)
    return long_steps


@pytest.mark.parametrize("max_epoch_iters", [4096, 1])
def test_steps_start_only_in_the_workers_own_slot(max_epoch_iters):
    wl = make_workload(200, 30.0, "splitwise-conv", seed=5)
    plan = FailurePlan((FailureSpec(2.0, workers=(1,)), FailureSpec(3.5, workers=(2,))))
    c = cfg(workers=6, workers_per_device=3, device_share="auto", cost=CTX, max_epoch_iters=max_epoch_iters,
            chunk_tokens=4096)
    assert c.share_mode == "slots" and c.device_groups()[:4] == [(0, 0, 3), (1, 0, 3), (0, 1, 3), (1, 1, 3)]
    slot = default_slot_s(CTX.step_time(0, SLOT_REF_BATCH, SLOT_REF_BATCH * SLOT_REF_CONTEXT))
    assert c.slot_s == slot
    for policy in ("lumen", "stop-restart"):
        sim = LoggedSim(c, wl, policy, plan, seed=2)
        res = sim.run()
        assert all(r.finish is not None for r in res.records)
        assert len(sim.log) == res.stats.iterations > 0
        assert {w for w, *_ in sim.log} == set(range(6))
        # long prefill steps occur and start only near their slot's beginning
        assert _check_in_own_slots(sim) > 0
    # the same workload with a share each: no gating at all, and slower than sharing nothing
    free = simulate(cfg(workers=6, cost=CTX), wl, "stop-restart", plan, seed=2)
    assert max(r.finish for r in free.records) < max(r.finish for r in res.records)


def test_slot_epochs_equal_iteration_by_iteration():
    # a cost constant within an epoch (no context term) and a slot length no step divides: jumping
    # over whole epochs lays the iterations out exactly where one-by-one start_at calls put them
    wl = make_workload(300, 20.0, "sharegpt", seed=3)
    cost = FittedCost((0.004, 2e-5, 1e-4, 0.0, 0.0))
    plan = FailurePlan((FailureSpec(5.0037, workers=(1,)),))
    for policy in ("stop-restart", "lumen-no-spec"):
        c = cfg(cost=cost, workers_per_device=2, device_share="slots", slot_ms=41.17)
        fast = simulate(c, wl, policy, plan, seed=1)
        slow = simulate(c.with_(max_epoch_iters=1), wl, policy, plan, seed=1)
        assert fast.stats.steps < slow.stats.steps / 4
        for x, y in zip(fast.records, slow.records, strict=True):
            assert x.first_token == pytest.approx(y.first_token, rel=1e-9, abs=1e-9)
            assert x.finish == pytest.approx(y.finish, rel=1e-9, abs=1e-9)


def test_n_workers_under_slots_each_serve_a_1_over_n_share_at_saturation():
    # decode-bound, saturated: every worker always has 8 decoding requests (10 ms per step alone)
    def wl(n):
        return [RequestSpec(i, 0.0, 1, 801) for i in range(8 * n)]
    alone = LoggedSim(cfg(workers=1), wl(1), "stop-restart")
    alone.run()
    solo = _rate(alone.log, 0, 1.0, 7.0)
    assert solo == pytest.approx(800.0)                  # 8 tokens per 10 ms
    slot_s = 0.0805                                      # 8 steps of 10 ms fit, 0.5 ms of each slot idle
    for share, kw in (("slots", dict(slot_ms=slot_s * 1e3)), ("shared", {})):
        sim = LoggedSim(cfg(workers=4, workers_per_device=4, device_share=share, **kw), wl(4), "stop-restart")
        sim.run()
        t1 = 1.0 + 20 * 4 * slot_s                       # whole cycles
        rates = [_rate(sim.log, w, 1.0, t1) for w in range(4)]
        for r in rates:
            assert r / solo == pytest.approx(0.25, rel=0.02), (share, rates)
    # a device per worker (4 devices of 1): each at the full rate
    sim = LoggedSim(cfg(workers=4, workers_per_device=1, device_share="slots"), wl(4), "stop-restart")
    sim.run()
    assert all(_rate(sim.log, w, 1.0, 7.0) == pytest.approx(solo) for w in range(4))


def test_losing_one_of_four_costs_a_quarter_under_slots_and_nothing_shared():
    # 1 ms per token position on the device: a worker's token rate is its share of the device's time
    wl = [RequestSpec(i, 0.0, 32, 2500) for i in range(64)]
    plan = FailurePlan((FailureSpec(20.0, workers=(3,)),))
    cycle = 4 * 0.5005
    out = {}
    for share in ("slots", "shared"):
        c = cfg(cost=PER_TOKEN, workers_per_device=4, device_share=share, slot_ms=500.5, restart_s=1e4,
                chunk_tokens=256)   # every step fits a slot (none overruns into the next)
        sim = LoggedSim(c, wl, "stop-restart", plan, seed=0)
        res = sim.run()
        assert res.stats.interrupted == 16 and all(r.finish is not None for r in res.records)
        # windows of whole cycles, before the failure and after its 16 requests were re-dispatched
        before = [_rate(sim.log, w, 2 * cycle, 9 * cycle) for w in range(3)]
        after = [_rate(sim.log, w, 30 * cycle, 50 * cycle) for w in range(3)]
        for b in before:
            assert b == pytest.approx(250.0, rel=0.03), (share, before)     # a quarter of the device each
        out[share] = [a / b for a, b in zip(after, before, strict=True)]
        assert _rate(sim.log, 3, 20.0, 50 * cycle) == 0.0
        if share == "slots":
            _check_in_own_slots(sim)
    # slots: the dead worker's slot stays empty, the survivors keep their quarter (isolation). 0.974
    # here: the larger batch's steps fill the 500.5 ms slot less well (23 x 21 ms vs 31 x 16 ms)
    assert all(0.96 <= x <= 1.01 for x in out["slots"]), out
    # shared: the three survivors split the whole device (1/3 each instead of 1/4)
    assert all(x == pytest.approx(4 / 3, rel=0.03) for x in out["shared"]), out


def test_one_worker_per_device_gives_exactly_the_old_results():
    wl = make_workload(300, 30.0, "splitwise-conv", seed=9)
    plan = FailurePlan((FailureSpec(3.0, count=2),), mtbf_s=20.0)
    slow = FittedCost(CTX.coef, colocated_slowdown=0.5)
    # (cost, nodes) -> policy -> (sum of first-token times, sum of finish times, epochs, iterations),
    # measured before device shares existed (commit 5b1ad4c)
    old = {
        (CTX, None): {"lumen": (1391.3747278363446, 2621.0225992871583, 795, 3213),
                      "stop-restart": (1392.7604326465503, 2628.9083566658687, 799, 3375)},
        (slow, 2): {"lumen": (1577.1002977643952, 3844.3194766897614, 691, 2075),
                    "stop-restart": (1612.0513271355226, 3897.023338703769, 713, 2546)},
    }
    for (cost, nodes), by_policy in old.items():
        for share in ("shared", "slots", "auto"):
            # spec_rule "fixed": lumen's figures from before the goodput rule (issue 24)
            c = cfg(cost=cost, nodes=nodes, workers_per_device=1, device_share=share, spec_rule="fixed")
            for policy, (ft, fin, steps, iters) in by_policy.items():
                res = simulate(c, wl, policy, plan, seed=4)
                assert sum(r.first_token for r in res.records) == pytest.approx(ft, rel=1e-12, abs=0)
                assert sum(r.finish for r in res.records) == pytest.approx(fin, rel=1e-12, abs=0)
                assert (res.stats.steps, res.stats.iterations) == (steps, iters)
                assert "may_assist" not in res.stats.policy_calls


def test_sharing_splits_the_kv_memory_and_restarting_workers_draft_only_with_a_slot():
    c = SimConfig(workers=8, model="qwen3-8b", device="h100", tp=1, workers_per_device=4)
    w = c.shape.weight_bytes
    assert c.kv_capacity_tokens(4) == int((80e9 * 0.9 - 4 * w) / 4 // c.shape.kv_bytes_per_token)
    assert c.kv_capacity_tokens(1) == int((80e9 * 0.9 - w) // c.shape.kv_bytes_per_token)
    with pytest.raises(ValueError, match="do not fit"):
        SimConfig(workers=4, workers_per_device=4).kv_capacity_tokens(4)
    wl = make_workload(200, 20.0, "sharegpt", seed=1)
    plan = FailurePlan((FailureSpec(2.0, workers=(0,)),))
    for share, assists in (("slots", True), ("shared", False)):
        res = simulate(cfg(workers_per_device=2, device_share=share, cost=CTX), wl, "lumen", plan, seed=0)
        assert res.stats.policy_calls["may_assist"] == 1
        assert (res.stats.assisted_steps > 0) == assists, share


def test_config_and_cli_reject_bad_values(capsys):
    for kw in (dict(workers_per_device=0), dict(device_share="half"), dict(slot_ms=0.0),
               dict(slot_ms=float("inf"))):
        with pytest.raises(ValueError):
            cfg(**kw)
    for argv in (["--workers-per-device", "0"], ["--workers-per-device", "two"],
                 ["--device-share", "half"], ["--slot-ms", "-5"], ["--slot-ms", "nan"]):
        with pytest.raises(SystemExit) as e:
            lumen_main(["simulate", *argv])
        assert e.value.code == 2
        assert "error: argument --" in capsys.readouterr().err
    # a model that does not fit its device share: one line, exit code 2
    assert lumen_main(["simulate", "--workers", "4", "--workers-per-device", "4", "--requests", "10",
                       "--repeats", "1", "--quiet", "--policy", "stop-restart"]) == 2
    assert "do not fit" in capsys.readouterr().err
    assert lumen_main(["simulate", "--workers", "4", "--workers-per-device", "2", "--model", "qwen3-0.6b",
                       "--device", "h100", "--tp", "1", "--slot-ms", "20", "--requests", "60", "--qps", "20",
                       "--repeats", "1", "--quiet", "--no-plots", "--policy", "stop-restart"]) == 0
    assert "2 per device, slots, 20 ms slots" in capsys.readouterr().out
