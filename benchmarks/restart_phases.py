"""How each failure run's killed worker came back, from the end states of a `lumen bench` directory: the
kill to SERVING, the target's read (from when it started), the draft's load (its read and its copy to the
device) where a draft was loaded, the copy of the target to the device and the warm-up; and, for a
speculative restart, what the assistance did (draft rounds, tokens proposed, and the partner's verified
and accepted draft positions, in how many (request, step) drafts).

Why: issue 24 bounds lumen's return against lumen-no-spec's by the draft's copy to the device; this puts
the parts of both returns side by side, per seed.

    python benchmarks/restart_phases.py RUNS_DIR [--out FILE]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_dir import main_over_runs

COLUMNS = ("run", "kill>SERVING", "target read", "draft load", "(read", "copy)", "h2d", "warm-up",
           "rounds", "proposed", "verified", "accepted", "drafts")


def _restarted(end: dict) -> dict | None:
    """The worker record of the restarted worker (epoch > 1) in a run's end state."""
    return next((w for w in end.get("workers", []) if w.get("epoch", 1) > 1), None)


def _partner_spec(end: dict) -> tuple[float, float, float]:
    """(draft positions verified, accepted, verify steps) summed over the workers that verified drafts."""
    ws = [w.get("stats", {}) for w in end.get("workers", []) if w.get("epoch", 1) == 1]
    return tuple(sum(float(s.get(k) or 0) for s in ws)
                 for k in ("spec_draft_tokens", "spec_accepted_tokens", "spec_drafts"))  # type: ignore[return-value]


def row(label: str, run_json: Path) -> list[str] | None:
    meta = json.loads(run_json.read_text())
    end = meta.get("cluster_end") or {}
    w = _restarted(end)
    kills = [e for e in meta.get("events") or [] if e.get("injected_wall") is not None]
    if w is None or not kills:
        return None
    p = w.get("phases_s", {})
    back = p.get("serving_at")
    kill_to_serving = back - min(e["injected_wall"] for e in kills) if back else None
    read = (p["disk_to_host_s"] - p.get("target_read_start_s", 0.0)) if "disk_to_host_s" in p else None
    drafted = bool(p.get("draft_ready"))
    verified, accepted, steps = _partner_spec(end) if drafted else (None, None, None)

    def f(v, digits=2):
        return "-" if v is None else f"{v:.{digits}f}"

    def n(v):
        return "-" if v is None else f"{v:.0f}"

    return [label, f(kill_to_serving), f(read), f(p.get("draft_load_s") if drafted else None),
            f(p.get("draft_disk_to_host_s") if drafted else None), f(p.get("draft_host_to_device_s") if drafted else None),
            f(p.get("host_to_device_s")), f(p.get("warmup_s")),
            n(p.get("assist_rounds") if drafted else None), n(p.get("assist_proposed_tokens") if drafted else None),
            n(verified), n(accepted), n(steps)]


def report(_runs: Path, runs: list[tuple[str, Path]]) -> list[str]:
    rows = [r for r in (row(label, f) for label, f in runs) if r is not None]
    if not rows:
        return ["no failure run with a restarted worker"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths)))
    return [fmt(COLUMNS), *(fmt(r) for r in rows),
            "seconds; target read from its start; draft load = its read (from the resident copy or disk) and its "
            "copy to the device plus building the drafter; verified/accepted: draft positions the "
            "surviving workers verified; drafts: the (request, step) pairs they verified a draft in"]


if __name__ == "__main__":
    sys.exit(main_over_runs(__doc__.split("\n\n")[0], report))
