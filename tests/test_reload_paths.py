"""benchmarks/reload_paths.py: the target's read timed on each of the worker's reload paths, each trial a fresh
process reading a real model directory from a cold page cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_reload_path_reads_the_whole_target(tmp_path):
    from cluster_util import make_tiny_model_dir

    target = make_tiny_model_dir(tmp_path / "target")
    draft = make_tiny_model_dir(tmp_path / "draft")
    out = tmp_path / "reload.json"
    p = subprocess.run([sys.executable, "benchmarks/reload_paths.py", "--model", str(target), "--draft", str(draft),
                        "--device", "cpu", "--store-gb", "0.05", "--repeats", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LUMEN_DRAFT_SHM": str(tmp_path / "shm")})
    assert p.returncode == 0, p.stderr
    # the draft is read from its resident copy, staged as a worker stages it
    (resident,) = (tmp_path / "shm").iterdir()
    assert json.loads(out.read_text())["draft"] == str(resident)
    doc = json.loads(out.read_text())
    # no CUDA here: no context to create, so no plain+ctx arm
    # nor a page-locked draft to compare with a pageable one
    assert [r["arm"] for r in doc["rows"]] == ["plain", "plain+store", "thread+draft", "draft"]
    assert all(r["target_s"] > 0 and r["total_s"] >= r["target_s"] for r in doc["rows"] if r["arm"] != "draft")
    assert all(r["draft_s"] > 0 and "store_s" in r for r in doc["rows"] if r["arm"] == "thread+draft")
    # a draft load is split into its read and its copy to the device; the draft arm reads no target
    for r in doc["rows"]:
        if "draft_s" in r:
            assert 0 < r["draft_read_s"] + r["draft_copy_s"] <= r["draft_s"]
    (alone,) = [r for r in doc["rows"] if r["arm"] == "draft"]
    assert "target_s" not in alone
    # then draft rounds as the recovering worker runs them: a fixed count alone, beside the read while it lasts
    assert len(alone["draft_rounds_s"]) == 30 and all(t > 0 for t in alone["draft_rounds_s"])
    (beside,) = [r for r in doc["rows"] if r["arm"] == "thread+draft"]
    assert isinstance(beside["draft_rounds_s"], list)
    assert doc["summary"]["draft"]["rounds"]["count_mean"] == 30
    assert {m: s.get("n") for m, s in doc["summary"].items()} == {"plain": 1, "plain+store": 1, "thread+draft": 1,
                                                                 "draft": None}
    assert doc["summary"]["draft"]["draft"]["n"] == 1 and doc["summary"]["thread+draft"]["draft"]["n"] == 1
    bad = subprocess.run([sys.executable, "benchmarks/reload_paths.py", "--model", str(target), "--repeats", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--repeats" in bad.stderr and "Traceback" not in bad.stderr


def test_a_failed_reload_is_reported_not_raised(tmp_path):
    import shutil

    from cluster_util import make_tiny_model_dir

    target = make_tiny_model_dir(tmp_path / "target")
    broken = tmp_path / "broken"
    shutil.copytree(target, broken)
    (w,) = broken.glob("*.safetensors")
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated while copying, say
    out = tmp_path / "reload.json"
    p = subprocess.run([sys.executable, "benchmarks/reload_paths.py", "--model", str(broken), "--device", "cpu",
                        "--store-gb", "0.05", "--repeats", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["arm"] for r in rows] == ["plain", "plain+store"] and all("error" in r for r in rows)
    bad = subprocess.run([sys.executable, "benchmarks/reload_paths.py", "--model", str(target), "--draft",
                          str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--draft" in bad.stderr and "Traceback" not in bad.stderr
