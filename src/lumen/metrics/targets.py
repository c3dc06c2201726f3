"""Where the interrupted requests went after a failure, per worker that took them over.

The paper's case against fixed-neighbour checkpointing is that its recovery load lands on one
neighbour (the ring successor holds every checkpoint of the dead worker, so it restores them all),
while load-aware placement spreads it. `recovery_targets` measures that the same way for the live
cluster (the controller's `recovered_here` counters in /lumen/cluster) and for the simulator (its
dispatch), so the two can be compared: the share of the interrupted requests, and of their context
tokens, that the busiest target took.

Input shape, per target worker: {"restored": n, "recomputed": n, "tokens": context tokens moved}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from .summary import ci95

COUNT_KEYS = ("restored", "recomputed", "tokens")


@dataclass(frozen=True)
class RecoveryTargets:
    requests: int             # interrupted requests dispatched (restored + recomputed)
    restored: int
    recomputed: int
    tokens: int               # their context tokens at the interruption
    targets: int              # distinct workers that took at least one
    top_worker: int | None    # the one that took the most tokens
    top_request_share: float  # its share of the requests (1.0: all on one worker; nan: none interrupted)
    top_token_share: float    # its share of the tokens

    def to_dict(self) -> dict:
        return asdict(self)


def recovery_targets(by_worker: Mapping[int | str, Mapping[str, int]]) -> RecoveryTargets:
    counts = {int(w): {k: int(c.get(k, 0) or 0) for k in COUNT_KEYS} for w, c in by_worker.items()}
    taken = {w: c for w, c in counts.items() if c["restored"] + c["recomputed"] > 0}
    restored = sum(c["restored"] for c in taken.values())
    recomputed = sum(c["recomputed"] for c in taken.values())
    tokens = sum(c["tokens"] for c in taken.values())
    requests = restored + recomputed
    if not taken:
        return RecoveryTargets(0, 0, 0, 0, 0, None, float("nan"), float("nan"))
    # ties go to the lower id, so the result does not depend on the mapping's order
    top = min(taken, key=lambda w: (-taken[w]["tokens"], -(taken[w]["restored"] + taken[w]["recomputed"]), w))
    top_requests = taken[top]["restored"] + taken[top]["recomputed"]
    return RecoveryTargets(requests, restored, recomputed, tokens, len(taken), top,
                           top_requests / requests, taken[top]["tokens"] / tokens if tokens else float("nan"))


def counts_between(before: Mapping[int, Mapping[str, int]] | None,
                   after: Mapping[int, Mapping[str, int]]) -> dict[int, dict[str, int]]:
    """The counts added between two readings of the cumulative counters (a cluster serving several runs)."""
    before = before or {}
    return {w: {k: int(c.get(k, 0) or 0) - int((before.get(w) or {}).get(k, 0) or 0) for k in COUNT_KEYS}
            for w, c in after.items()}


def aggregate_targets(rows: Iterable[tuple[str, RecoveryTargets]]) -> list[dict]:
    """Per policy, over its failure runs that interrupted anything: mean top shares with 95% CIs,
    the restored fraction, and the runs and requests they rest on."""
    by_policy: dict[str, list[RecoveryTargets]] = {}
    for policy, t in rows:
        if t.requests:
            by_policy.setdefault(policy, []).append(t)
    out = []
    for policy, ts in by_policy.items():
        req_share = ci95(t.top_request_share for t in ts)
        tok_share = ci95(t.top_token_share for t in ts)
        requests = sum(t.requests for t in ts)
        out.append({"policy": policy, "runs": len(ts), "requests": requests,
                    "restored_fraction": sum(t.restored for t in ts) / requests,
                    "mean_targets": sum(t.targets for t in ts) / len(ts),
                    "top_request_share": req_share[0], "top_request_share_ci": req_share[1],
                    "top_token_share": tok_share[0], "top_token_share_ci": tok_share[1]})
    return out
