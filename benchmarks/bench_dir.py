"""What the scripts that read a `lumen bench` directory share (runs_pages.py, phase_latency.py): its
finished runs, the last attempt in a run's cluster log, and their command line, RUNS_DIR [--out FILE]."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def last_attempt(log: Path) -> str | None:
    """The cluster log of a run's last attempt; None without a log. A run cut at a block's end and
    re-run by --resume appends to the same log; each attempt starts with its command line, "$ ..."."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    last = text.rfind("\n$ ")
    return text[last + 1:] if last >= 0 else text


def main_over_runs(description: str, report: Callable[[Path, list[tuple[str, Path]]], list[str]]) -> int:
    """Parse RUNS_DIR [--out FILE]; `report(runs_dir, [(label, run.json), ...])` gives the lines,
    which are printed and written to FILE. No finished run: a message and exit code 2."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    runs = [(f.name[: -len(".run.json")], f) for f in sorted((a.runs / "records").glob("*.run.json"))]
    if not runs:
        print(f"no runs under {a.runs}/records", file=sys.stderr)
        return 2
    text = "\n".join(report(a.runs, runs))
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0
