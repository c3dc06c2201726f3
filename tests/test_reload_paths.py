"""benchmarks/reload_paths.py: the target's read timed on each of the worker's two reload paths, from a cold
page cache, on a real model directory."""

from __future__ import annotations

import json
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
                        "--device", "cpu", "--repeats", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert [r["mode"] for r in doc["rows"]] == ["main", "thread", "thread+draft", "thread", "thread+draft", "main"]
    assert all(r["target_s"] > 0 for r in doc["rows"])
    assert all(r["draft_s"] > 0 for r in doc["rows"] if r["mode"] == "thread+draft")
    assert {m: s["n"] for m, s in doc["summary"].items()} == {"main": 2, "thread": 2, "thread+draft": 2}
    bad = subprocess.run([sys.executable, "benchmarks/reload_paths.py", "--model", str(target), "--repeats", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--repeats" in bad.stderr and "Traceback" not in bad.stderr
