"""benchmarks/phase_latency.py: latency before the kill, until the killed worker is back, and after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _request(arrival: float, ttft: float, tpot: float) -> dict:
    first = arrival + ttft
    return {"arrival": arrival, "first_token": first, "token_times": [first, first + tpot, first + 2 * tpot]}


def _write_run(d: Path, label: str, requests: list[dict], kill_s: float | None, log: str) -> None:
    events = [{"injected_s": kill_s, "worker": 1}] if kill_s is not None else []
    (d / "records" / f"{label}.run.json").write_text(json.dumps({"events": events}))
    (d / "records" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    (d / "logs" / f"{label}.log").write_text(log)


def test_phases_are_cut_at_the_kill_and_at_the_killed_workers_return(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "logs").mkdir()
    # the kill at 10 s of the run's clock, logged at 12:00:10; the worker's epoch 2 serves 20 s later
    log = ("$ python -m lumen serve (an attempt cut at a block's end)\n"
           "2026-12-04 11:00:00,000 lumen.launcher INFO worker 3 (epoch 1, pid 9) exited with -9\n"
           "2026-12-04 11:00:01,000 lumen.controller INFO worker 3 epoch 2: switching -> serving {}\n"
           "$ python -m lumen serve ...\n"
           "2026-12-04 12:00:10,000 lumen.launcher INFO worker 1 (epoch 1, pid 7) exited with -9\n"
           "2026-12-04 12:00:12,000 lumen.controller INFO worker 0 epoch 1: switching -> serving {}\n"
           "2026-12-04 12:00:30,000 lumen.controller INFO worker 1 epoch 2: switching -> serving {}\n")
    failed = [_request(1, 0.2, 0.03), _request(15, 0.4, 0.05), _request(29, 0.6, 0.05), _request(31, 0.1, 0.02)]
    _write_run(tmp_path, "lumen-seed0", failed, 10.0, log)
    calm = [_request(1, 0.2, 0.03), _request(15, 0.2, 0.03), _request(35, 0.2, 0.03)]
    _write_run(tmp_path, "no-failure-seed0", calm, None, "$ python -m lumen serve ...\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "phase_latency.py"), str(tmp_path),
                          "--out", str(tmp_path / "phases.txt")], capture_output=True, text=True, check=True).stdout
    lumen = next(line for line in out.splitlines() if line.startswith("lumen-seed0"))
    # before: 200 ms / 30 ms; kill..back (10..30 s): (400 + 600) / 2 ms, 50 ms; after: 100 ms / 20 ms
    assert "10.0.. 30.0 |   200.0   500.0   100.0 |    30.0    50.0    20.0" in lumen
    calm_line = next(line for line in out.splitlines() if line.startswith("no-failure-seed0"))
    assert "10.0.. 30.0 |   200.0   200.0   200.0" in calm_line  # cut where its seed's failure run was
    assert calm_line.startswith("no-failure-seed0 *") and "* cut at the median times" in out
    assert (tmp_path / "phases.txt").read_text() == out
    # a run of lumen bench since abb5879 carries its own return time, which wins over the log
    meta = json.loads((tmp_path / "records" / "lumen-seed0.run.json").read_text())
    (tmp_path / "records" / "lumen-seed0.run.json").write_text(json.dumps({**meta, "outage_end_s": 28.0}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "phase_latency.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "lumen-seed0               10.0.. 28.0 |   200.0   400.0   350.0" in out


def test_an_empty_directory_is_an_error_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "phase_latency.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no runs" in r.stderr and "Traceback" not in r.stderr
