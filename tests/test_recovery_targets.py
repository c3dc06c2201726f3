"""Where the interrupted requests went (lumen.metrics.targets), as the bench and the simulator report it:
the measure itself, and the paper's claim it exists to check -- fixed-neighbour checkpointing lands the
recovery load on one worker, load-aware placement spreads it."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from lumen.metrics.targets import RecoveryTargets, aggregate_targets, counts_between, recovery_targets
from lumen.sim import FailurePlan, FailureSpec, FittedCost, SimConfig, simulate
from lumen.workload import make_workload


def test_nothing_interrupted_gives_no_share_rather_than_zero():
    t = recovery_targets({0: {"restored": 0, "recomputed": 0, "tokens": 0}})
    assert (t.requests, t.targets, t.top_worker) == (0, 0, None) and math.isnan(t.top_token_share)
    assert aggregate_targets([("lumen", t)]) == []


def test_the_busiest_target_is_the_one_with_most_tokens():
    t = recovery_targets({"0": {"restored": 3, "recomputed": 0, "tokens": 300},
                          "1": {"restored": 0, "recomputed": 1, "tokens": 700},
                          "2": {"restored": 0, "recomputed": 0, "tokens": 0}})
    assert (t.requests, t.restored, t.recomputed, t.tokens, t.targets, t.top_worker) == (4, 3, 1, 1000, 2, 1)
    assert t.top_request_share == 0.25 and t.top_token_share == 0.7


@given(st.dictionaries(st.integers(0, 63), st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(1, 10**6)),
                       max_size=16))
def test_shares_are_fractions_and_an_even_spread_is_the_floor(raw):
    counts = {w: {"restored": a, "recomputed": b, "tokens": tok} for w, (a, b, tok) in raw.items()}
    t = recovery_targets(counts)
    if t.requests == 0:
        return
    assert t.requests == sum(a + b for a, b, _ in raw.values())
    # the busiest of k targets takes at least 1/k of the tokens, and the share never exceeds 1
    assert 1 / t.targets - 1e-12 <= t.top_token_share <= 1.0
    assert 0 < t.top_request_share <= 1.0
    # the answer does not depend on the mapping's order
    assert recovery_targets(dict(reversed(list(counts.items())))) == t


def test_counts_between_two_readings_of_cumulative_counters():
    before = {0: {"restored": 1, "recomputed": 0, "tokens": 100}}
    after = {0: {"restored": 3, "recomputed": 1, "tokens": 450}, 1: {"restored": 1, "recomputed": 0, "tokens": 50}}
    assert counts_between(before, after) == {0: {"restored": 2, "recomputed": 1, "tokens": 350},
                                             1: {"restored": 1, "recomputed": 0, "tokens": 50}}
    assert counts_between(None, after) == {w: dict(c) for w, c in after.items()}


def test_aggregate_gives_each_policy_its_mean_share_over_runs():
    one = RecoveryTargets(4, 4, 0, 400, 1, 2, 1.0, 1.0)
    spread = RecoveryTargets(4, 2, 2, 400, 2, 0, 0.5, 0.5)
    rows = {r["policy"]: r for r in aggregate_targets([("fixed-ckpt", one), ("fixed-ckpt", one), ("lumen", spread)])}
    assert rows["fixed-ckpt"]["runs"] == 2 and rows["fixed-ckpt"]["top_token_share"] == 1.0
    assert rows["fixed-ckpt"]["top_token_share_ci"] == 0.0 and rows["fixed-ckpt"]["restored_fraction"] == 1.0
    assert rows["lumen"]["restored_fraction"] == 0.5 and math.isnan(rows["lumen"]["top_token_share_ci"])


def test_simulator_fixed_neighbour_concentrates_the_recovery_load_and_lumen_spreads_it():
    # 8 workers at a load where each holds a dozen requests when worker 3 dies: fixed-ckpt's ring
    # successor holds all of its checkpoints, lumen's load-aware placement spread them.
    cfg = SimConfig(workers=8, cost=FittedCost((0.004, 2e-5, 1e-4, 1e-7, 1e-9)), kv_tokens=10**6,
                    restart_s=5.0, ckpt_budget_gb=40.0)
    wl = make_workload(600, 60.0, "sharegpt", seed=5)
    plan = FailurePlan((FailureSpec(4.0, workers=(3,)),))
    fixed = recovery_targets(simulate(cfg, wl, "fixed-ckpt", plan, seed=0).stats.recovered_here)
    lumen = recovery_targets(simulate(cfg, wl, "lumen-no-spec", plan, seed=0).stats.recovered_here)
    assert fixed.requests == lumen.requests >= 8
    assert fixed.top_worker == 4 and fixed.top_token_share >= 0.8
    assert lumen.targets >= 4 and lumen.top_token_share <= 0.5
