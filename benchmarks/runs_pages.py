"""What happened to the checkpoint pages in each run of a `lumen bench` directory, before any latency
figure is read: pages sent / accepted / refused by reason / stalled / skipped, the longest wait in a
sender's queue, what each restore found ("restoring X of Y pages" in the cluster log) and how many
workers were declared dead. A run whose holders refused most pages says nothing about LUMEN.
Counters are the workers' at the end of the run: the killed incarnation's own (its pages sent) are
gone, so the share is accepted over what the holders received (accepted + refused), not over sent.

    python benchmarks/runs_pages.py RUNS_DIR [--out FILE]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench_dir import last_attempt, main_over_runs

COUNTERS = ("pages_sent", "ckpt_pages_accepted", "ckpt_rejected_pages", "ckpt_rejected_unreserved", "pages_stalled",
            "pages_obsolete", "export_deferred", "restored_pages")
RESTORING = re.compile(r"restoring (\d+) of (\d+) pages")


def summarize(run_json: Path, log: Path) -> dict:
    meta = json.loads(run_json.read_text())
    workers = ((meta.get("cluster_end") or {}).get("workers")) or []
    row = {k: 0 for k in COUNTERS}
    queued_max = 0.0
    for w in workers:
        stats = w.get("stats") or {}
        for k in COUNTERS:
            row[k] += int(stats.get(k, 0) or 0)
        queued_max = max(queued_max, float(stats.get("kv_tx_queued_max_s", 0) or 0))
    row["queued_max_s"] = round(queued_max, 3)
    row["refused_other"] = row["ckpt_rejected_pages"] - row["ckpt_rejected_unreserved"]  # all reasons, less one
    found = total = dead = 0
    text = last_attempt(log)
    if text is not None:
        for m in RESTORING.finditer(text):
            found, total = found + int(m.group(1)), total + int(m.group(2))
        dead = text.count("declared dead")
    row.update(restorable=found, interrupted_pages=total, declared_dead=dead)
    return row


def report(runs_dir: Path, runs: list[tuple[str, Path]]) -> list[str]:
    lines = []
    for label, f in runs:
        row = summarize(f, runs_dir / "logs" / f"{label}.log")
        sent = row["pages_sent"]
        received = row["ckpt_pages_accepted"] + row["ckpt_rejected_pages"]
        share = f"{row['ckpt_pages_accepted'] / received:.0%}" if received else "-"
        lines.append(f"{label:24s} sent {sent:6d} accepted {row['ckpt_pages_accepted']:6d} ({share:>4s} of received) "
                     f"unreserved {row['ckpt_rejected_unreserved']:5d} other refusals {row['refused_other']:4d} "
                     f"stalled {row['pages_stalled']:5d} obsolete {row['pages_obsolete']:5d} "
                     f"queue max {row['queued_max_s']:6.3f}s | restorable {row['restorable']}/{row['interrupted_pages']} "
                     f"restored {row['restored_pages']} | declared dead {row['declared_dead']}")
    return lines


if __name__ == "__main__":
    sys.exit(main_over_runs(__doc__.split("\n\n")[0], report))
