"""LUMEN_STEP_LOG: a live engine's per-step rows (lumen.engine.profile.StepLog) are a profile CSV that
the simulator's fitted cost model loads."""

from __future__ import annotations

import csv

import torch

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.engine.profile import COLUMNS, STEP_LOG_ENV, STEP_LOG_MONO, STEP_LOG_TIME, StepLog
from lumen.model import PRESETS
from lumen.model.loader import random_model
from lumen.sim.cost import load_profile, read_profile


def test_step_log_rows_load_as_a_profile(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv(STEP_LOG_ENV, raising=False)
    assert StepLog.from_env(0, 1) is None  # unset: no log at all
    monkeypatch.setenv(STEP_LOG_ENV, str(tmp_path / "steps"))
    log = StepLog.from_env(3, 2)
    assert log is not None and log.path == tmp_path / "steps" / "worker3-epoch2.csv"

    eng = Engine(random_model(PRESETS["tiny"], dtype=torch.float32, seed=1), EngineConfig(num_blocks=128))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    steps = 0
    for i, n in enumerate((5, 17, 9, 30, 12)):  # arrivals between steps: mixed prefill / decode batches
        eng.add_request(f"r{i}", list(range(1, n + 1)), params)
        for _ in range(2):
            eng.step()
            log.record(eng)
            log.record(eng)  # the same step twice is written once
            steps += 1
    while eng.has_work():
        eng.step()
        log.record(eng)
        steps += 1
    log.record(eng)  # nothing ran since: no row
    log.close()

    with open(log.path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == (*COLUMNS, STEP_LOG_TIME, *STEP_LOG_MONO) and len(rows) == steps
    assert all(float(r[STEP_LOG_TIME]) > 1e9 for r in rows)
    assert sum(float(r["num_prefill_tokens"]) for r in rows) == 5 + 17 + 9 + 30 + 12
    assert all(float(r["step_time_s"]) > 0 for r in rows)

    # a second incarnation's file appended to later keeps one header
    again = StepLog(log.path)
    eng.add_request("late", [1, 2, 3], params)
    while eng.has_work():
        eng.step()
        again.record(eng)
    again.close()
    text = log.path.read_text()
    assert text.count("num_prefill_tokens") == 1
    assert len(read_profile(log.path)) == steps + 6

    cost = load_profile(log.path)
    assert cost.rows == steps + 6 and cost.colocated_slowdown == 0
    assert cost.step_time(8, 2, 80) > 0
