"""Each worker's latency in the three phases of a failure run: before the kill, from the kill until the
killed worker served again ("kill..back"), and after (the phases of benchmarks/phase_latency.py).

Requests are placed in a phase by arrival, and attributed to workers by ``RequestRecord.workers``
(which lumen's gateway reports): a request's TTFT to the worker that produced its first token, its
TPOT to the worker that produced its last one, and only where one worker produced all its tokens and
it was not interrupted (a recovered request's TPOT holds its outage). So a worker that verified a
recovering worker's drafts shows whether its own requests got slower while it did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .records import RequestRecord, mean, tpot, ttft

__all__ = ["PHASES", "per_worker_phases"]

PHASES = ("before", "kill..back", "after")


def per_worker_phases(records: Sequence[RequestRecord], kill_s: float, back_s: float | None,
                      failed: Iterable[int] = ()) -> dict:
    """Per worker id and phase: requests served (its first token's worker), their mean TTFT, and the
    mean TPOT of the uninterrupted one-worker requests it finished. ``kill_s``/``back_s`` cut the phases
    (run clock; ``back_s`` None: the killed worker never came back, "after" stays empty); ``failed``
    (the workers the plan killed or stopped) are marked.

    Returns ``{"phases", "bounds_s": [kill, back], "workers": [{"worker", "failed", "n", "ttft_mean",
    "n_tpot", "tpot_mean"}, ...]}`` with each figure a list over ``PHASES`` (NaN: none), workers in id
    order; ``{}`` where no record names its workers (a server other than lumen, older results)."""
    end = math.inf if back_s is None else back_s
    failed = set(failed)

    def phase(r: RequestRecord) -> int:
        return 0 if r.arrival < kill_s else 1 if r.arrival < end else 2

    ttfts: dict[int, list[list[float]]] = {}
    tpots: dict[int, list[list[float]]] = {}
    for r in records:
        if not r.workers:
            continue
        p = phase(r)
        first, last = r.workers[0], r.workers[-1]
        ttfts.setdefault(first, [[], [], []])
        tpots.setdefault(last, [[], [], []])
        t = ttft(r)
        if math.isfinite(t):
            ttfts[first][p].append(t)
        if len(r.workers) == 1 and not r.interrupted:
            t = tpot(r)
            if math.isfinite(t):
                tpots[last][p].append(t)
    if not ttfts:
        return {}
    empty = [[], [], []]
    rows = []
    for w in sorted(set(ttfts) | set(tpots)):
        a, b = ttfts.get(w, empty), tpots.get(w, empty)
        rows.append({"worker": w, "failed": w in failed,
                     "n": [len(x) for x in a], "ttft_mean": [mean(x) for x in a],
                     "n_tpot": [len(x) for x in b], "tpot_mean": [mean(x) for x in b]})
    return {"phases": list(PHASES), "bounds_s": [float(kill_s), None if back_s is None else float(back_s)],
            "workers": rows}
