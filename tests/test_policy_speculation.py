"""The goodput rule of mechanism 3 (lumen.policy.speculation): properties the issue names, on the
fitted step-time form (the live worker's) and on the roofline of a real shape (the simulator's)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumen.policy.speculation import (
    AcceptanceEstimate,
    LinearStepTime,
    PartnerLoad,
    assist_gain,
    choose_spec_lengths,
    draft_phase_pays,
    expected_tokens,
    fit_step_time,
    pairing_gain,
    pick_by_gain,
)
from lumen.sim.cost import DEVICES, MODELS, RooflineCost

# the CPU box's embedded model, fitted from its step log (order of magnitude: 20 ms a step, 3 ms a position)
CPU_LIKE = LinearStepTime((0.020, 2.0e-4, 3.0e-3, 2.0e-6, 0.0))
H100_8B = RooflineCost(MODELS["qwen3-8b"], DEVICES["h100"]).step_time

coefs = st.tuples(st.floats(1e-4, 0.1), st.floats(0, 1e-3), st.floats(1e-6, 1e-2), st.floats(0, 1e-5),
                  st.floats(0, 1e-7)).map(LinearStepTime)
alphas = st.lists(st.floats(0.0, 0.95), min_size=1, max_size=12)


def load(decoding, context=0.0, queued_tokens=0, queued_requests=0, chunk=256):
    return PartnerLoad(decoding, context, queued_tokens, queued_requests, chunk)


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.6, 4) == pytest.approx(1 + 0.6 + 0.36 + 0.216 + 0.1296)


@given(coefs, st.integers(1, 12), st.integers(1, 8))
def test_zero_acceptance_never_speculates(step, n, k_max):
    assert choose_spec_lengths([0.0] * n, load(n, 100.0 * n), step, k_max) == [0] * n


@pytest.mark.parametrize("step", [CPU_LIKE, H100_8B], ids=["cpu-fitted", "h100-8b-roofline"])
def test_light_load_speculates(step):
    # one or a few decoding requests, nothing queued, alpha ~ 0.6: speculation pays
    for n in (1, 2, 4):
        ks = choose_spec_lengths([0.6] * n, load(n, 300.0 * n, chunk=2048), step, 4)
        assert all(k >= 1 for k in ks), ks
    assert choose_spec_lengths([0.6], load(1, 300.0, chunk=2048), H100_8B, 4) == [4]


def test_queued_prefill_takes_the_budget_first():
    # the queue's prompt tokens fill the step: no verify position, however cheap
    assert choose_spec_lengths([0.9] * 4, load(4, 1000.0, queued_tokens=252, queued_requests=1), H100_8B, 4) == [0] * 4
    ks = choose_spec_lengths([0.9] * 4, load(4, 1000.0, queued_tokens=246, queued_requests=1), H100_8B, 4)
    assert sum(ks) <= 6


@settings(max_examples=300)
@given(coefs, alphas, st.integers(0, 8), st.integers(0, 400), st.integers(0, 6), st.integers(0, 200),
       st.integers(0, 6), st.integers(1, 6))
def test_more_queued_work_never_raises_verify_positions(step, acc, extra_dec, queued, queued_req, more_tok,
                                                        more_req, k_max):
    n = len(acc)
    base = load(n + extra_dec, 50.0 * (n + extra_dec), queued, queued_req)
    more = load(n + extra_dec, 50.0 * (n + extra_dec), queued + more_tok, queued_req + more_req)
    assert sum(choose_spec_lengths(acc, more, step, k_max)) <= sum(choose_spec_lengths(acc, base, step, k_max))


@settings(max_examples=300)
@given(alphas, st.integers(0, 8), st.integers(0, 400), st.integers(0, 6), st.integers(0, 200), st.integers(0, 6),
       st.integers(1, 6), st.sampled_from([64, 512, 2048]))
def test_more_queued_work_never_raises_verify_positions_roofline(acc, extra_dec, queued, queued_req, more_tok,
                                                                 more_req, k_max, ctx):
    n = len(acc)
    base = load(n + extra_dec, ctx * (n + extra_dec), queued, queued_req, chunk=2048)
    more = load(n + extra_dec, ctx * (n + extra_dec), queued + more_tok, queued_req + more_req, chunk=2048)
    assert sum(choose_spec_lengths(acc, more, H100_8B, k_max)) <= sum(choose_spec_lengths(acc, base, H100_8B, k_max))


@settings(max_examples=300)
@given(coefs, st.floats(0.05, 0.95), st.integers(1, 16), st.integers(1, 16), st.floats(1, 2000), st.integers(1, 6))
def test_a_bigger_batch_never_raises_a_requests_k(step, alpha, n, more, ctx, k_max):
    """More decoding requests (same acceptance, same context each, nothing queued): no request gets a
    longer draft. (The total may still grow with the batch while the step is memory-bound: more
    requests to speculate on, each cheaply; that is the goodput answer, not a leak.)"""
    small = choose_spec_lengths([alpha] * n, load(n, ctx * n, chunk=1 << 16), step, k_max)
    big = choose_spec_lengths([alpha] * (n + more), load(n + more, ctx * (n + more), chunk=1 << 16), step, k_max)
    assert max(big) <= max(small)


def test_compute_bound_partner_stops_speculating():
    # the 8B shape on an H100: at 16 decoding requests verify is nearly free (HBM-bound); at 256 every
    # position costs a full token of compute and the rule backs off
    light = sum(choose_spec_lengths([0.6] * 16, load(16, 16 * 512.0, chunk=1 << 14), H100_8B, 4))
    heavy = choose_spec_lengths([0.6] * 256, load(256, 256 * 512.0, chunk=1 << 14), H100_8B, 4)
    assert light == 64
    assert max(heavy) < 4


def test_ties_go_to_the_earlier_request_and_higher_acceptance_first():
    step = LinearStepTime((0.02, 0.0, 0.004, 0.0, 0.0))
    ks = choose_spec_lengths([0.5, 0.9, 0.5], load(3, 0.0), step, 4)
    assert ks[1] >= ks[0] >= ks[2]


def test_acceptance_estimate_moves_from_prior_to_data():
    est = AcceptanceEstimate(0.6)
    assert est.rate == pytest.approx(0.6)
    for _ in range(50):
        est.update(4, 0)  # every first token rejected
    assert est.rate < 0.15
    good = AcceptanceEstimate(0.2)
    for _ in range(50):
        good.update(4, 4)  # all accepted: no failure observed
    assert good.rate > 0.95
    mixed = AcceptanceEstimate(0.5, prior_tokens=0.0)
    for _ in range(1000):
        mixed.update(4, 1)  # one accepted, then a rejection: 1 success in 2 trials
    assert mixed.rate == pytest.approx(0.5)


def test_fit_step_time_recovers_a_linear_model():
    true = LinearStepTime((0.01, 1e-4, 2e-3, 1e-6, 1e-8))
    rows = [(p, d, c, true(p, d, c)) for p in (0, 32, 128) for d in (1, 4, 8) for c in (64, 512)]
    fit = fit_step_time(rows)
    for p, d, c, t in rows:
        assert fit(p, d, c) == pytest.approx(t, rel=1e-6)
    with pytest.raises(ValueError):
        fit_step_time([(0, 1, 10, 0.01)])


def test_fit_step_time_leaves_what_never_varied_to_the_intercept():
    # one request decoding alone: D is always 1, so nothing says what a position costs
    rows = [(0, 1, c, 0.01 + 1e-6 * c) for c in range(100, 400, 10)]
    fit = fit_step_time(rows)
    assert fit.coef[2] == 0.0
    assert fit(0, 1, 250) == pytest.approx(0.01025, rel=1e-3)


def test_pick_by_gain_keeps_the_partner_unless_another_gains_clearly_more():
    assert pick_by_gain({}) is None
    assert pick_by_gain({1: 0.0, 2: 0.0}) is None
    assert pick_by_gain({1: 5.0, 2: 5.0}) == 1
    assert pick_by_gain({1: 5.0, 2: 6.0}, current=1) == 1
    assert pick_by_gain({1: 5.0, 2: 7.0}, current=1) == 2
    assert pick_by_gain({1: 0.0, 2: 1.0}, current=1) == 2


def test_assist_gain_is_zero_without_speculation_and_positive_at_light_load():
    assert assist_gain([0.0, 0.0], load(2, 100.0), CPU_LIKE, 4) == 0.0
    assert assist_gain([0.6], load(1, 100.0, queued_tokens=256), CPU_LIKE, 4) == 0.0
    g = assist_gain([0.6], load(1, 100.0), CPU_LIKE, 4)
    assert g > 0 and math.isfinite(g)


def test_draft_phase_pays():
    assert not draft_phase_pays(0.0, 10.0, 0.0, 50.0)        # no gain: never
    assert draft_phase_pays(0.0, 10.0, 1.0, 50.0)            # resident: any gain pays
    assert draft_phase_pays(1.0, 20.0, 10.0, 50.0)           # 200 tokens gained > 50 displaced
    assert not draft_phase_pays(5.0, 20.0, 10.0, 50.0)       # 200 < 250


def test_live_fit_tells_a_position_from_a_sequence():
    # a CPU engine whose decode step costs ~10 ms per sequence (per-request work) and little per token
    true = LinearStepTime((0.002, 3e-4, 2e-4, 0.0, 0.0), seq_coef=0.01)
    plain = [(p, s, c, true(p, s, c), s) for p in (0, 32) for s in (1, 2, 3, 4) for c in (100.0 * s, 700.0 * s)]
    # no verify step seen: a position is priced as a prefill token, the rest goes to the sequence
    fit = fit_step_time(plain)
    assert fit.coef[2] == pytest.approx(fit.coef[1], rel=1e-6)
    assert fit.seq_coef > 20 * fit.coef[2]
    # with verify steps (positions beyond the sequences) all six are fitted
    verify = [(0, s * (1 + k), 300.0 * s, true(0, s * (1 + k), 300.0 * s, s), s) for s in (1, 2, 3) for k in (1, 2, 4)]
    fit = fit_step_time(plain + verify)
    assert fit.coef[2] == pytest.approx(2e-4, rel=0.05) and fit.seq_coef == pytest.approx(0.01, rel=0.05)
    # priced per sequence, speculation on this engine is cheap: alpha 0.6 verifies K = 4 for 2 requests
    assert choose_spec_lengths([0.6, 0.6], load(2, 128.0), fit.for_batch(2), 4) == [4, 4]


def test_a_pair_stays_together_for_its_minimum_dwell():
    assert pick_by_gain({1: 0.0, 2: 9.0}, current=1, paired_for_s=1.0) == 1
    assert pick_by_gain({1: 0.0, 2: 9.0}, current=1, paired_for_s=6.0) == 2


def test_pairing_gain_looks_past_a_queue_that_fills_one_step():
    busy = load(2, 200.0, queued_tokens=256, queued_requests=1)
    assert assist_gain([0.6, 0.6], busy, CPU_LIKE, 4) == 0.0      # this step: the queue takes the budget
    assert pairing_gain([0.6, 0.6], busy, CPU_LIKE, 4) > 0.0     # over the pair's seconds: it pays
    # the queued request still weighs: a partner with more waiting gains less
    more = load(2, 200.0, queued_tokens=256, queued_requests=6)
    assert pairing_gain([0.6, 0.6], more, CPU_LIKE, 4) <= pairing_gain([0.6, 0.6], busy, CPU_LIKE, 4)


@pytest.mark.parametrize("args, message", [
    (["--spec-acceptance", "1.5"], "--spec-acceptance must be a probability"),
    (["--spec-k", "99"], "--spec-k must be between 0 and 16"),
    (["--draft-first", "bogus"], "argument --draft-first: invalid choice: 'bogus'"),
])
def test_serve_rejects_bad_speculation_settings(args, message, capsys):
    # in this process (what `python -m lumen` runs: lumen.cli.main), not a fresh interpreter that spends
    # ~3 s of a 2-core box importing torch: an exception other than the usage error escapes and fails it
    from lumen.cli import main as lumen_main

    try:
        code = lumen_main(["serve", "--model", "unused", *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
