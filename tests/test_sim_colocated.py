"""Co-located workers (CPU workers sharing one host): the profile's colocated_busy rows give the
fitted cost a slowdown, and the simulator applies it to workers of the same node only while they
step at the same time (issue 7 item 7, the fidelity gap it closes)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lumen.sim import SimConfig, load_profile, read_profile, simulate
from lumen.sim.cost import FittedCost
from lumen.workload import RequestSpec


def _base(p, d, c):
    return 0.1 + 0.004 * p + 0.01 * d + 1e-5 * c


def test_profile_colocated_rows_give_the_slowdown_and_do_not_bias_the_fit(tmp_path):
    grid = [(p, d, c) for p in (0, 32, 128) for d in (0, 1, 4) for c in (64, 256) if p or d]
    lines = ["num_prefill_tokens,num_decode_seqs,total_context_tokens,step_time_s,colocated_busy"]
    for p, d, c in grid:
        tot = d * c + p
        lines.append(f"{p},{d},{tot},{_base(p, d, tot):.9g},0")
        lines.append(f"{p},{d},{tot},{_base(p, d, tot) * 1.6:.9g},1")   # one other worker busy: +60%
    path = tmp_path / "prof.csv"
    path.write_text("\n".join(lines) + "\n")
    assert len(read_profile(path)) == len(grid)          # the plain reader keeps the solo rows
    cost = load_profile(path)
    assert cost.colocated_slowdown == pytest.approx(0.6, rel=1e-6)
    assert cost.step_time(32, 4, 300) == pytest.approx(_base(32, 4, 300), rel=1e-6)


def test_colocated_slowdown_applies_only_while_both_workers_of_a_node_step():
    cost = FittedCost((0.1, 0.0, 0.0, 0.0, 0.0), colocated_slowdown=1.0)   # every step 0.1 s alone
    cfg = SimConfig(workers=2, model="smollm2-135m", device="h100", tp=1, chunk_tokens=256, kv_tokens=8192,
                    cost=cost, nodes=1)
    together = [RequestSpec(0, 0.0, 16, 11), RequestSpec(1, 0.0, 16, 11)]   # one per worker, same time
    recs = simulate(cfg, together, "stop-restart").records
    # 11 steps each (the prefill and 10 decodes), both stepping: 0.2 s a step. The first worker to
    # start planned its first step alone; a change reaches a worker after its iteration in flight
    # (as everywhere in the simulator), so that one step stays 0.1 s, and the other's last step,
    # in flight when the first finishes, stays 0.2 s.
    assert sorted(r.first_token for r in recs) == pytest.approx([0.1, 0.2])
    assert sorted(r.finish for r in recs) == pytest.approx([0.1 + 10 * 0.2, 11 * 0.2])
    apart = [RequestSpec(0, 0.0, 16, 11), RequestSpec(1, 5.0, 16, 11)]
    for r in simulate(cfg, apart, "stop-restart").records:   # never overlap: the solo cost
        assert r.finish - r.arrival == pytest.approx(11 * 0.1)
    # separate nodes (or no node layout, the default): no interference
    for c in (replace(cfg, nodes=2), replace(cfg, nodes=None)):
        for r in simulate(c, together, "stop-restart").records:
            assert r.finish - r.arrival == pytest.approx(11 * 0.1)


def test_partial_overlap_retimes_the_running_worker():
    cost = FittedCost((0.1, 0.0, 0.0, 0.0, 0.0), colocated_slowdown=1.0)
    cfg = SimConfig(workers=2, model="smollm2-135m", device="h100", tp=1, chunk_tokens=256, kv_tokens=8192,
                    cost=cost, nodes=1)
    # worker 0 runs 21 steps from t=0; worker 1's request comes at t=1.05 (mid step 11) and runs 11
    wl = [RequestSpec(0, 0.0, 16, 21), RequestSpec(1, 1.05, 16, 11)]
    r0, r1 = sorted(simulate(cfg, wl, "stop-restart").records, key=lambda r: r.req_id)
    # r0: 11 solo steps to 1.1 (the one in flight keeps its time), then 10 shared ones of 0.2 s
    assert r0.finish == pytest.approx(1.1 + 10 * 0.2)
    # r1: shared steps from 1.05; its step in flight when r0 ends (3.05-3.25) keeps its time
    assert r1.first_token == pytest.approx(1.25)
    assert r1.finish == pytest.approx(1.05 + 11 * 0.2)


def test_slowdown_is_measured_against_the_same_point_alone():
    # the fit says 0.1 s for everything, but while the co-located rows were measured the box was
    # twice as slow: the solo rows of the same points (measured right before/after) show it
    rows = [(0.0, float(d), 64.0 * d, 0.1, 0) for d in range(1, 7)]
    rows += [(0.0, 1.0, 64.0, 0.2, 0), (0.0, 1.0, 64.0, 0.2, 0), (0.0, 1.0, 64.0, 0.3, 1),
             (0.0, 2.0, 128.0, 0.2, 0), (0.0, 2.0, 128.0, 0.2, 0), (0.0, 2.0, 128.0, 0.3, 1),
             (0.0, 3.0, 192.0, 0.2, 0), (0.0, 3.0, 192.0, 0.2, 0), (0.0, 3.0, 192.0, 0.3, 1)]
    from lumen.sim.cost import fit_colocated_slowdown

    base = FittedCost((0.1, 0.0, 0.0, 0.0, 0.0))
    assert fit_colocated_slowdown(base, rows) == pytest.approx(0.5)   # 0.3 / median(0.1, 0.2, 0.2) - 1 = 0.5
    assert fit_colocated_slowdown(base, [r for r in rows if r[4] == 0]) == 0.0
