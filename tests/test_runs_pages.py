"""benchmarks/runs_pages.py: the page summary that every GPU block prints before its latency figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_summary_counts_what_holders_accepted_and_what_restores_found(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "logs").mkdir()
    workers = [
        {"id": 0, "stats": {"pages_sent": 100, "ckpt_pages_accepted": 30, "ckpt_rejected_unreserved": 60,
                            "ckpt_rejected_bad_tag": 2, "ckpt_rejected_pages": 62, "pages_stalled": 5,
                            "kv_tx_queued_max_s": 1.5}},
        {"id": 1, "stats": {"pages_sent": 20, "ckpt_pages_accepted": 8, "restored_pages": 4}},
    ]
    (tmp_path / "records" / "lumen-seed0.run.json").write_text(json.dumps({"cluster_end": {"workers": workers}}))
    (tmp_path / "logs" / "lumen-seed0.log").write_text(
        # an attempt cut at a block's end, then the re-run that --resume appended: only the last one counts
        "$ python -m lumen serve ...\nx WARNING worker 1 epoch 1 declared dead: process exited (-9)\n"
        "y INFO request z: restoring 9 of 9 pages\n"
        "$ python -m lumen serve ...\nx WARNING worker 1 epoch 1 declared dead: process exited (-9)\n"
        "y INFO request a: restoring 4 of 10 pages\ny INFO request b: restoring 0 of 6 pages\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "runs_pages.py"), str(tmp_path),
                          "--out", str(tmp_path / "pages.txt")], capture_output=True, text=True, check=True).stdout
    line = out.strip()
    assert line.startswith("lumen-seed0")
    # 38 accepted of 100 received (38 + 60 unreserved + 2 bad tags)
    assert "sent    120 accepted     38 ( 38% of received)" in line
    assert "unreserved    60 other refusals    2" in line and "stalled     5" in line
    assert "queue max  1.500s" in line and "restorable 4/16 restored 4" in line and "declared dead 1" in line
    assert (tmp_path / "pages.txt").read_text().strip() == line


def test_an_empty_directory_is_an_error_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "runs_pages.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no runs" in r.stderr and "Traceback" not in r.stderr
