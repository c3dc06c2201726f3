"""benchmarks/checkpoint_overhead.py's step summary: step times and the gaps between a busy worker's steps."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("checkpoint_overhead", ROOT / "benchmarks" / "checkpoint_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, steps: list[tuple[float, float, int]]) -> None:
    """steps: (end time, duration, prefill tokens); prefill steps have no decodes."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("num_prefill_tokens", "num_decode_seqs", "total_context_tokens", "step_time_s", "time_s"))
        for end, dt, prefill in steps:
            w.writerow((prefill, 0 if prefill else 2, 100, dt, end))


def test_gaps_count_only_a_busy_workers_pauses_inside_the_window(tmp_path):
    mod = _module()
    # worker 0: steps of 4 ms with 1 ms between them, then an idle second, then one more step 1 ms on
    _write(tmp_path / "worker0-epoch1.csv",
           [(100.004, 0.004, 0), (100.009, 0.004, 0), (100.020, 0.010, 64), (101.5, 0.004, 0), (101.505, 0.004, 0)])
    # worker 1: 3 ms gaps; its first step ends before the window and counts neither as a step nor
    # for the gap to the next one (4 ms, under the cut)
    _write(tmp_path / "worker1-epoch1.csv", [(99.999, 0.004, 0), (100.007, 0.004, 0), (100.014, 0.004, 0)])
    s = mod.step_summary(tmp_path, 100.0, 102.0)
    assert s["decode_steps"] == 6 and s["prefill_steps"] == 1
    assert s["mean_prefill_step_ms"] == pytest.approx(10.0)
    # gaps: worker 0 1, 1, 1 ms (the idle 1.48 s is not one); worker 1 3 ms
    assert s["busy_gaps"] == 4 and s["long_gaps"] == 1  # worker 0's idle second
    assert s["mean_step_gap_ms"] == pytest.approx(1.5)
    assert s["p99_step_gap_ms"] is None  # fewer than 100 gaps


@pytest.mark.parametrize("n_arms", [2, 3, 4])
def test_arm_order_balances_positions_over_even_repeats(n_arms):
    mod = _module()
    arms = [f"arm{i}" for i in range(n_arms)]
    for repeats in (2, 4):
        positions = {a: 0 for a in arms}
        for rep in range(repeats):
            order = mod.arm_order(arms, rep)
            assert sorted(order) == arms
            for i, a in enumerate(order):
                positions[a] += i
        assert len(set(positions.values())) == 1, positions
    assert mod.arm_order(["stop-restart", "lumen"], 1) == ["lumen", "stop-restart"]
