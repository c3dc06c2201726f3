"""The paper's recovery time (DESIGN.md §6), computed exactly and documented precisely.

Definition implemented by :func:`recovery_period`:

1. Requests present in both runs (matched by ``req_id``) are sorted by arrival (ties by
   ``req_id``) and cut into consecutive windows of ``window`` requests; the last window holds
   the remainder. Both runs replay the same seeded workload, so window k holds the same requests
   in both.
2. For each window, m_k = mean TTFT over its requests in the failure run and b_k the same in the
   no-failure run (requests that never got a first token are left out of the mean; a window in
   which none did has m_k = NaN and counts as degraded).
3. Window k is *degraded* when m_k > (1 + threshold) · b_k, and *within* otherwise (a window
   better than the baseline is within). A baseline window with no TTFT at all is within.
4. The affected period starts at the first degraded window s (optionally only counting windows
   that could have felt the failure, see ``not_before``) and ends at the first window e > s
   that begins a run of ``settle`` consecutive within-windows. Affected windows are s … e−1.
5. Recovery time (seconds) = first arrival of window e − first arrival of window s, i.e. the
   arrival-time span of the affected windows.
   - Never degraded: recovery time 0, ``recovered`` True, no affected requests.
   - Degraded but no run of ``settle`` within-windows before the data ends (fewer than
     ``settle`` windows left also counts as not recovered): the period runs to the end of the
     run, recovery time = (last finish time in the failure run, or last arrival if nothing
     finished) − first arrival of window s, and ``recovered`` is False — a censored value, a
     lower bound on the true recovery time.
   Only the first affected period is measured (as in the paper); later degradations, e.g. from
   a second failure long after recovery, are not added.

``not_before`` (default None = exactly the paper): with several-hundred-request windows the
pre-failure windows match the baseline closely, but short live runs use small windows whose
noise can exceed 5% before anything failed. When ``not_before`` is a time (the first failure),
a window can *start* the period only if at least one of its requests had not received its first
token by then (a window whose requests all got their first token before the failure cannot have
its TTFT changed by the failure).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .records import RequestRecord, mean, ttft

__all__ = ["RecoveryPeriod", "recovery_period"]


@dataclass
class RecoveryPeriod:
    window: int
    threshold: float
    settle: int
    window_first_arrival: list[float] = field(default_factory=list)
    window_mid_arrival: list[float] = field(default_factory=list)  # (first + last arrival) / 2
    window_mean_ttft: list[float] = field(default_factory=list)
    baseline_mean_ttft: list[float] = field(default_factory=list)
    degraded_windows: list[bool] = field(default_factory=list)
    start_window: int | None = None  # first affected window; None if never degraded
    end_window: int | None = None  # first of the `settle` recovered windows; None if not reached
    degraded: bool = False
    recovered: bool = True
    start_time: float | None = None
    end_time: float | None = None
    recovery_time_s: float = 0.0
    affected_req_ids: list[int] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return len(self.window_mean_ttft)


def recovery_period(
    records: Sequence[RequestRecord],
    baseline_records: Sequence[RequestRecord],
    window: int = 200,
    threshold: float = 0.05,
    settle: int = 3,
    not_before: float | None = None,
) -> RecoveryPeriod:
    """Affected period and recovery time of a failure run against its no-failure run.

    See the module docstring for the exact definition.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if settle < 1:
        raise ValueError(f"settle must be >= 1, got {settle}")
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    base = {r.req_id: r for r in baseline_records}
    if len(base) != len(baseline_records):
        raise ValueError("baseline_records has duplicate req_id values")
    seen: set[int] = set()
    for r in records:
        if r.req_id in seen:
            raise ValueError(f"records has duplicate req_id {r.req_id}")
        seen.add(r.req_id)
    common = sorted((r for r in records if r.req_id in base), key=lambda r: (r.arrival, r.req_id))
    if not common:
        raise ValueError("no request of the failure run is in the baseline run (different workloads?)")

    out = RecoveryPeriod(window=window, threshold=threshold, settle=settle)
    windows = [common[i : i + window] for i in range(0, len(common), window)]
    for w in windows:
        m = mean(ttft(r) for r in w)
        b = mean(ttft(base[r.req_id]) for r in w)
        out.window_first_arrival.append(w[0].arrival)
        out.window_mid_arrival.append((w[0].arrival + w[-1].arrival) / 2.0)
        out.window_mean_ttft.append(m)
        out.baseline_mean_ttft.append(b)
        if math.isnan(b):
            out.degraded_windows.append(False)
        else:
            out.degraded_windows.append(math.isnan(m) or m > (1.0 + threshold) * b)

    def can_start(k: int) -> bool:
        if not_before is None:
            return True
        return any(r.first_token is None or r.first_token > not_before for r in windows[k])

    start = next((k for k, d in enumerate(out.degraded_windows) if d and can_start(k)), None)
    if start is None:
        return out  # never degraded: recovery time 0, recovered
    out.degraded = True
    out.start_window = start
    out.start_time = out.window_first_arrival[start]
    end = None
    run = 0
    for k in range(start + 1, len(windows)):
        run = 0 if out.degraded_windows[k] else run + 1
        if run == settle:
            end = k - settle + 1
            break
    if end is None:
        out.recovered = False
        finishes = [r.finish for r in records if r.finish is not None]
        out.end_time = max(finishes) if finishes else max(r.arrival for r in records)
        affected = windows[start:]
    else:
        out.end_window = end
        out.end_time = out.window_first_arrival[end]
        affected = windows[start:end]
    out.recovery_time_s = max(0.0, out.end_time - out.start_time)
    out.affected_req_ids = [r.req_id for w in affected for r in w]
    return out
