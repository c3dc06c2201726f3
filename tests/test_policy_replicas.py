"""lumen.policy, issue 25: K checkpoint holders over failure domains (`place_checkpoints`), the
`auto` rule (`choose_replicas` and its failure model), and the restore source (`restore_source`)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumen.policy import (
    POLICY_NAMES,
    ClusterTable,
    ClusterView,
    CopyPrice,
    FailureModel,
    ReplicaRule,
    WorkerState,
    WorkerView,
    choose_replicas,
    co_failure_probability,
    domain_count,
    loss_probability,
    parse_replicas,
    place_checkpoint,
    place_checkpoints,
    restore_source,
    spread_occupancy,
)

S = WorkerState
GB = 10**9


def wv(i, state=S.SERVING, alive=True, q=0.0, reserved=0, budget=100 * GB, node=None, epoch=0):
    return WorkerView(i, state, epoch, alive, 0, 0, q, reserved, budget, 26e9, node)


def _asdict(w):
    return {f: getattr(w, f) for f in WorkerView.__slots__}


@st.composite
def clusters(draw, min_workers=1, max_workers=12):
    n = draw(st.integers(min_workers, max_workers))
    ids = draw(st.permutations(range(n + draw(st.integers(0, 3)))))[:n]
    nodes = draw(st.sampled_from([[None], ["a", "b"], ["a", "b", "c"], [None, "a", "b", "c", "d"], [0, 1, 2, 3]]))
    ws = []
    for i in ids:
        budget = draw(st.sampled_from([0, 4 * GB, 16 * GB, 100 * GB]))
        ws.append(WorkerView(
            id=i, state=draw(st.sampled_from([S.SERVING] * 4 + list(S))), epoch=draw(st.integers(0, 2)),
            alive=draw(st.booleans() | st.just(True)), waiting=draw(st.integers(0, 12)),
            running=draw(st.integers(0, 12)), q_wait_s=draw(st.floats(0, 20, allow_nan=False)),
            ckpt_reserved_bytes=draw(st.integers(0, budget)), ckpt_budget_bytes=budget,
            h2d_bytes_per_s=draw(st.sampled_from([10e9, 26e9, 50e9])),
            node=draw(st.sampled_from(nodes)), partner=None))
    return ClusterView(tuple(ws), lam=draw(st.sampled_from([0.0, 1.0, 2.5])))


def _fits(view, ex, s, exclude=()):
    return [w for w in view.workers if w.id != ex and w.id not in exclude and w.serving
            and w.ckpt_free_bytes >= s]


def _dom(w):
    return ("id", w.id) if w.node is None else ("node", w.node)


# ---------------------------------------------------------------- place_checkpoints: examples

def test_two_holders_in_distinct_domains_outside_the_executors():
    # executor 0 on node a; node a's other worker is the cheapest, node b the next: the copies go to
    # b and c, one each, before any copy shares a domain or sits beside the executor
    view = ClusterView((wv(0, node="a"), wv(1, node="a"), wv(2, node="b", q=1.0), wv(3, node="b", q=2.0),
                        wv(4, node="c", q=3.0)))
    assert place_checkpoints(view, "lumen", 0, GB, 2) == [2, 4]
    # a third copy: every other domain holds one, so the executor's domain and b tie on occupancy;
    # outside the executor's domain first
    assert place_checkpoints(view, "lumen", 0, GB, 3) == [2, 4, 3]
    assert place_checkpoints(view, "lumen", 0, GB, 4) == [2, 4, 3, 1]
    assert place_checkpoints(view, "lumen", 0, GB, 9) == [2, 4, 3, 1]     # fewer fit: as many as fit


def test_k1_is_place_checkpoint_and_existing_holders_count():
    view = ClusterView((wv(0, node="a"), wv(1, node="b"), wv(2, node="b", q=0.5), wv(3, node="c", q=1.0)))
    assert place_checkpoints(view, "lumen", 0, GB, 1) == [place_checkpoint(view, "lumen", 0, GB)] == [1]
    # re-protection: 1 keeps its copy; the missing one avoids 1's domain even though 2 is cheaper
    assert place_checkpoints(view, "lumen", 0, GB, 1, existing=[1]) == [3]
    assert place_checkpoints(view, "lumen", 0, GB, 0) == []
    assert place_checkpoints(view, "stop-restart", 0, GB, 2) == []
    assert place_checkpoints(view, "spec-only", 0, GB, 2) == []


def test_budget_counts_per_holder_and_unknown_nodes_are_their_own_domain():
    view = ClusterView((wv(0, node="a"), wv(1, node="a", reserved=99 * GB), wv(2), wv(3, q=5.0)))
    # worker 1 cannot take 2 GB; 2 and 3 (unknown nodes) are separate domains outside a
    assert place_checkpoints(view, "lumen", 0, 2 * GB, 3) == [2, 3]
    assert place_checkpoints(view, "lumen", 0, GB // 2, 3) == [2, 3, 1]


def test_fixed_ckpt_takes_the_next_k_in_ring_order():
    view = ClusterView((wv(0), wv(1, state=S.DOWN), wv(2, budget=0), wv(3), wv(5)))
    assert place_checkpoints(view, "fixed-ckpt", 3, GB, 2) == [5, 0]
    # the next two after 0 are 2 (no room: dropped, not replaced) and 3
    assert place_checkpoints(view, "fixed-ckpt", 0, GB, 2) == [3]
    assert place_checkpoints(view, "fixed-ckpt", 0, GB, 1) == []
    assert place_checkpoint(view, "fixed-ckpt", 0, GB) is None
    assert place_checkpoints(view, "fixed-ckpt", 3, GB, 2, existing=[5]) == [0]   # skips 5; 2 has no room
    assert place_checkpoints(view, "fixed-ckpt", 5, GB, 9) == [0, 3]


# ---------------------------------------------------------------- place_checkpoints: properties

def _paper_holder(view, policy, ex, s):
    """DESIGN.md section 3's single-holder rule written out plainly, as a reference for k = 1."""
    ws = sorted(view.workers, key=lambda w: w.id)
    fits = [w for w in ws if w.serving and w.id != ex]
    if policy == "fixed-ckpt":  # the next SERVING worker in ring order, if it has room
        ring = [w for w in fits if w.id > ex] + [w for w in fits if w.id < ex]
        return ring[0].id if ring and ring[0].ckpt_free_bytes >= s else None
    if policy not in ("lumen", "lumen-no-spec"):
        return None
    fits = [w for w in fits if w.ckpt_free_bytes >= s]
    exw = next((w for w in ws if w.id == ex), None)
    if exw is not None and exw.node is not None and any(w.node != exw.node for w in fits):
        fits = [w for w in fits if w.node != exw.node]
    if not fits:
        return None
    return min(fits, key=lambda w: (w.q_wait_s + view.lam * (w.ckpt_reserved_bytes + s) / w.h2d_bytes_per_s,
                                    w.id)).id


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.data())
def test_prop_k1_is_the_papers_single_holder_rule(view, data):
    ex = data.draw(st.sampled_from([w.id for w in view.workers] + [99]))
    s = data.draw(st.sampled_from([GB, 3 * GB, 20 * GB]))
    for policy in POLICY_NAMES:
        h = _paper_holder(view, policy, ex, s)
        assert place_checkpoints(view, policy, ex, s, 1) == ([] if h is None else [h]), policy
        assert place_checkpoint(view, policy, ex, s) == h


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.data())
def test_prop_distinct_fitting_holders_never_the_executor(view, data):
    ids = [w.id for w in view.workers]
    ex = data.draw(st.sampled_from(ids + [99]))
    k = data.draw(st.integers(1, 6))
    s = data.draw(st.sampled_from([GB, 3 * GB, 20 * GB]))
    existing = data.draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))
    for policy in POLICY_NAMES:
        hs = place_checkpoints(view, policy, ex, s, k, existing)
        assert len(hs) == len(set(hs)) <= k
        assert ex not in hs and not set(hs) & set(existing)
        for h in hs:
            w = view.worker(h)
            assert w.serving and w.ckpt_free_bytes >= s
        if policy in ("lumen", "lumen-no-spec"):
            # as many as fit, up to k
            assert len(hs) == min(k, len(_fits(view, ex, s, existing)))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(min_workers=2), st.data())
def test_prop_copies_spread_over_domains(view, data):
    """Never two copies in one domain (nor one beside the executor) while a domain with fewer of the
    request's workers has a fitting candidate; and with enough fitting domains the k copies sit in
    k distinct domains, none of them the executor's. Within a domain class: the cheapest."""
    ids = [w.id for w in view.workers]
    ex = data.draw(st.sampled_from(ids))
    k = data.draw(st.integers(1, 5))
    s = data.draw(st.sampled_from([GB, 3 * GB]))
    hs = place_checkpoints(view, "lumen", ex, s, k)
    exw = view.worker(ex)
    occ = {_dom(exw): 1}
    chosen: list[int] = []
    for h in hs:
        cands = _fits(view, ex, s, chosen)
        low = min(occ.get(_dom(w), 0) for w in cands)
        hw = view.worker(h)
        assert occ.get(_dom(hw), 0) == low, "a copy went to a fuller domain while an emptier one fit"
        pool = [w for w in cands if occ.get(_dom(w), 0) == low]
        outside = [w for w in pool if _dom(w) != _dom(exw)]
        pool = outside or pool
        score = {w.id: w.q_wait_s + view.lam * (w.ckpt_reserved_bytes + s) / w.h2d_bytes_per_s for w in pool}
        assert h == min(score, key=lambda i: (score[i], i))
        occ[_dom(hw)] = occ.get(_dom(hw), 0) + 1
        chosen.append(h)
    other = {_dom(w) for w in _fits(view, ex, s)} - {_dom(exw)}
    if len(other) >= k:
        doms = [_dom(view.worker(h)) for h in hs]
        assert len(set(doms)) == len(hs) == k and _dom(exw) not in doms


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(min_workers=2), st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.integers(1, 8),
                                                   st.integers(1, 4)), max_size=40))
def test_prop_per_holder_budgets_hold(view, ops):
    """Interleave K-copy placements (s reserved on every holder) and releases: no budget is exceeded."""
    workers = {w.id: w for w in view.workers}
    ids = sorted(workers)
    live: list[tuple[int, int]] = []
    for is_place, i, size_gb, k in ops:
        if is_place or not live:
            s = size_gb * GB
            for h in place_checkpoints(ClusterView(tuple(workers.values()), view.lam), "lumen", ids[i % len(ids)], s, k):
                w = workers[h]
                workers[h] = WorkerView(**{**_asdict(w), "ckpt_reserved_bytes": w.ckpt_reserved_bytes + s})
                live.append((h, s))
        else:
            h, s = live.pop(i % len(live))
            w = workers[h]
            workers[h] = WorkerView(**{**_asdict(w), "ckpt_reserved_bytes": w.ckpt_reserved_bytes - s})
        assert all(w.ckpt_reserved_bytes <= w.ckpt_budget_bytes for w in workers.values())


@settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(min_workers=2), st.randoms(use_true_random=False), st.data())
def test_prop_deterministic_order_independent_and_table_equal(view, rnd, data):
    ex = data.draw(st.sampled_from([w.id for w in view.workers]))
    k = data.draw(st.integers(1, 4))
    ws = list(view.workers)
    rnd.shuffle(ws)
    # the same cluster as a ClusterTable (dense ids 0..n-1; nodes as integer codes)
    dense = {w.id: j for j, w in enumerate(sorted(view.workers, key=lambda w: w.id))}
    codes: dict = {}
    t = ClusterTable(len(dense))
    for w in view.workers:
        j = dense[w.id]
        t.set_state(j, w.state)
        t.set_alive(j, w.alive)
        t.q[j], t.reserved[j], t.budget[j], t.h2d[j] = w.q_wait_s, w.ckpt_reserved_bytes, w.ckpt_budget_bytes, w.h2d_bytes_per_s
        t.node[j] = -1 if w.node is None else codes.setdefault(w.node, len(codes))
    for policy in ("lumen", "fixed-ckpt"):
        a = place_checkpoints(view, policy, ex, GB, k)
        assert a == place_checkpoints(ClusterView(tuple(ws), view.lam), policy, ex, GB, k)
        assert [dense[h] for h in a] == place_checkpoints(t.view(view.lam), policy, dense[ex], GB, k)


def test_a_large_cluster_spreads_over_all_domains():
    # 64 workers in 4 nodes of 16; three copies of a request on node 0 land on nodes 1, 2, 3
    rng = random.Random(0)
    view = ClusterView(tuple(wv(i, q=rng.random(), node=i // 16) for i in range(64)))
    hs = place_checkpoints(view, "lumen", 5, GB, 3)
    assert sorted(h // 16 for h in hs) == [1, 2, 3]
    assert domain_count(view) == 4
    assert domain_count(ClusterView(tuple(wv(i) for i in range(4)))) is None


# ---------------------------------------------------------------- failure model and auto rule

def test_failure_model_and_co_failure_probability():
    m = FailureModel.from_mtbf(worker_mtbf_s=100.0, domain_mtbf_s=None)
    p, q = m.over(10.0)
    assert p == pytest.approx(1 - math.exp(-0.1)) and q == 0.0
    assert FailureModel().over(1e9) == (0.0, 0.0)
    # executor + one holder, distinct domains: both must fail
    assert co_failure_probability(0.1, 0.0, (1, 1)) == pytest.approx(0.01)
    # same domain: the domain failing takes both
    assert co_failure_probability(0.1, 0.2, (2,)) == pytest.approx(0.2 + 0.8 * 0.01)
    assert spread_occupancy(2, None) == (1, 1, 1)
    assert spread_occupancy(2, 4) == (1, 1, 1)
    assert spread_occupancy(2, 2) == (2, 1)
    assert spread_occupancy(4, 2) == (3, 2)
    assert spread_occupancy(0, 1) == (1,)
    with pytest.raises(ValueError):
        co_failure_probability(1.5, 0.0, (1,))
    with pytest.raises(ValueError):
        choose_replicas(1.0, 1.0, 0.1, 0.0, 0)


def test_auto_examples():
    # rare failures: one copy; risky and expensive recompute, cheap copies: up to k_max
    assert choose_replicas(10.0, 0.01, 0.0, 0.0, 3) == 1
    assert choose_replicas(10.0, 0.0, 0.0, 0.0, 3) == 1          # no risk at all: nothing to buy
    assert choose_replicas(10.0, 0.01, 0.2, 0.0, 3) == 3         # 10 x 0.04 > 0.01, 10 x 0.008 > 0.01
    assert choose_replicas(10.0, 0.1, 0.2, 0.0, 3) == 2          # 10 x 0.008 <= 0.1
    assert choose_replicas(10.0, 0.01, 0.2, 0.0, 1) == 1
    # one domain for everything: a domain failure takes all copies, so copies buy nothing against q
    assert choose_replicas(10.0, 0.5, 0.0, 0.2, 3, domains=1) == 3
    assert loss_probability(3, 0.0, 0.2, 1) == pytest.approx(0.2)
    price = CopyPrice(per_net_s=1e-3, per_gb_s=1e-6)
    assert price.cost_s(1.25e9, 1.25e9, 2e9, 10.0) == pytest.approx(1e-3 + 2e-5)


probs = st.floats(0.0, 1.0, allow_nan=False)
costs = st.floats(0.0, 100.0, allow_nan=False)
doms = st.none() | st.integers(1, 6)


@settings(max_examples=250)
@given(costs, costs, probs, probs, probs, probs, st.integers(1, 5), doms)
def test_prop_more_risk_never_lowers_k(recompute, cost, p1, p2, q1, q2, k_max, d):
    lo_p, hi_p = sorted((p1, p2))
    lo_q, hi_q = sorted((q1, q2))
    k_lo = choose_replicas(recompute, cost, lo_p, lo_q, k_max, d)
    assert 1 <= k_lo <= k_max
    assert choose_replicas(recompute, cost, lo_p, hi_q, k_max, d) >= k_lo      # more correlated risk
    assert choose_replicas(recompute, cost, hi_p, lo_q, k_max, d) >= k_lo      # more independent risk
    assert choose_replicas(recompute, cost, hi_p, hi_q, k_max, d) >= k_lo


@settings(max_examples=250)
@given(costs, costs, costs, probs, probs, st.integers(1, 5), doms)
def test_prop_pricier_copy_never_raises_k_and_costlier_loss_never_lowers_it(recompute, c1, c2, p, q, k_max, d):
    lo, hi = sorted((c1, c2))
    assert choose_replicas(recompute, hi, p, q, k_max, d) <= choose_replicas(recompute, lo, p, q, k_max, d)
    assert choose_replicas(recompute + 1.0, lo, p, q, k_max, d) >= choose_replicas(recompute, lo, p, q, k_max, d)


@settings(max_examples=150)
@given(costs, st.floats(1e-6, 100.0), st.floats(0, 1e-4), st.floats(0, 1e-4), st.integers(1, 5), doms)
def test_prop_k1_when_failures_are_rare(recompute, cost, p, q, k_max, d):
    # whenever the one-copy loss is below a copy's price: rare failures, or nothing to lose
    if recompute * loss_probability(1, p, q, d) <= cost:
        assert choose_replicas(recompute, cost, p, q, k_max, d) == 1
    assert choose_replicas(recompute, cost, 0.0, 0.0, k_max, d) == 1
    assert choose_replicas(0.0, 0.0, p, q, k_max, d) == 1


@settings(max_examples=250)
@given(probs, probs, st.integers(0, 6), st.integers(1, 7))
def test_prop_loss_probability_monotone(p, q, k, d):
    # another copy never raises it; fewer domains (more correlation) never lowers it
    assert loss_probability(k + 1, p, q, d) <= loss_probability(k, p, q, d) + 1e-15
    assert loss_probability(k, p, q, d) <= loss_probability(k, p, q, max(1, d - 1)) + 1e-15
    assert loss_probability(k, p, q, d) >= loss_probability(k, p, q, None) - 1e-15
    for dp in (0.0, 0.1):
        assert loss_probability(k, min(1.0, p + dp), min(1.0, q + dp), d) >= loss_probability(k, p, q, d) - 1e-15


# ---------------------------------------------------------------- restore source

def test_restore_source_longest_live_valid_prefix():
    view = ClusterView((wv(0), wv(1, alive=False), wv(2), wv(3, epoch=1), wv(4, state=S.DOWN)))
    assert restore_source(view, [(1, 900, None), (2, 300, 0), (3, 500, 1)]) == 3
    assert restore_source(view, [(1, 900, None), (2, 300, 0), (3, 500, 0)]) == 2     # 3 restarted: stale
    assert restore_source(view, [(3, 300, None), (2, 300, None)]) == 2               # tie: lowest id
    assert restore_source(view, [(1, 900, None), (4, 900, None), (7, 900, None)]) is None
    assert restore_source(view, []) is None


# ---------------------------------------------------------------- ReplicaRule: --ckpt-replicas as one call

def test_parse_replicas():
    assert parse_replicas("auto") == parse_replicas(" AUTO ") == "auto"
    assert parse_replicas("2") == parse_replicas(2) == 2
    for bad in ("0", "-1", "two", "", "1.5"):
        with pytest.raises(ValueError):
            parse_replicas(bad)
    with pytest.raises(ValueError):
        ReplicaRule("0")
    with pytest.raises(ValueError):
        ReplicaRule("auto", k_max=0)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.floats(0, 600), st.floats(0, 3600), st.floats(1e6, 1e9), st.sampled_from([60.0, 600.0, None]),
       st.sampled_from([300.0, None]), st.integers(1, 4))
def test_prop_the_rule_is_choose_replicas_over_the_failure_model_and_the_copy_price(recompute, life, nbytes, w_mtbf,
                                                                                 d_mtbf, k_max):
    view = ClusterView(tuple(wv(i, node="ab"[i % 2]) for i in range(6)))
    fm, price = FailureModel.from_mtbf(w_mtbf, d_mtbf), CopyPrice(1e-3, 1e-5)
    rule = ReplicaRule("auto", k_max, fm, price)
    p, q = fm.over(life)
    want = choose_replicas(recompute, price.cost_s(nbytes, 1.25e9, nbytes, life), p, q, k_max, domains=2)
    assert rule.k_for(view, recompute, life, nbytes, 1.25e9) == want
    assert 1 <= want <= rule.most == k_max
    # a fixed K is K, whatever the request
    assert ReplicaRule(2, k_max, fm, price).k_for(view, recompute, life, nbytes, 1.25e9) == 2
    # no failures planned: one copy
    assert ReplicaRule("auto", k_max).k_for(view, recompute, life, nbytes, 1.25e9) == 1
