"""Routing of new requests and recovery dispatch (DESIGN.md section 3, "Recovery dispatch")."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from .names import Policy, features, parse_policy
from .states import WorkerState
from .view import Assignment, ClusterView, NoServingWorker, RequestView

_SERVING = WorkerState.SERVING


def _eligible(w) -> bool:
    return w.alive and w.state == _SERVING


def _least_loaded(workers: Iterable, extra: Mapping[int, int] | None = None,
                  by: Literal["count", "wait"] = "count") -> int | None:
    """argmin over SERVING workers of outstanding work, ties to the lowest id.

    count: waiting + running (+ extra[w], requests assigned but not yet reflected in the view).
    wait:  q_wait_s first, then the count, then id.
    """
    best_id: int | None = None
    best_key: tuple | None = None
    for w in workers:
        if not (w.alive and w.state == _SERVING):
            continue
        c = w.waiting + w.running
        if extra:
            c += extra.get(w.id, 0)
        key = (c, w.id) if by == "count" else (w.q_wait_s, c, w.id)
        if best_key is None or key < best_key:
            best_key, best_id = key, w.id
    return best_id


def route_new(view: ClusterView, *, by: Literal["count", "wait"] = "count") -> int | None:
    """The router for new requests, under every policy: least outstanding work among SERVING
    workers (waiting + running; `by="wait"` orders by q_wait_s first), ties to the lowest id.
    None when no worker is SERVING (the caller queues or rejects)."""
    return _least_loaded(view.workers, None, by)


def dispatch_interrupted(view: ClusterView, policy: str | Policy,
                         interrupted: Sequence[RequestView]) -> list[Assignment]:
    """Where each interrupted request goes, and whether it restores or recomputes.

    `view` is the cluster after the failure (the failed worker DOWN). Requests are decided in
    ascending id order; the result is in that order. Raises NoServingWorker if none is SERVING
    (and `interrupted` is not empty).

    lumen / lumen-no-spec (DESIGN.md section 3 steps 1-3):
      1. r goes to its holder h(r) if h(r) is alive and SERVING (and, when `holder_epoch` is set,
         still in that epoch): restore. Otherwise to the least-loaded SERVING worker: recompute.
         "Least-loaded" counts requests assigned earlier in this same call, so recomputes of a
         large failure spread out instead of piling onto one worker.
      2. c_w = waiting + running + newly assigned, over SERVING workers; avg = mean c_w.
      3. While the most loaded worker holding requests assigned in step 1 has c_w > avg and
         c_w - 1 >= c_min + 1: move its request with the shortest valid prefix (a recompute
         counts as prefix 0; ties by request id) to the least-loaded worker as a recompute;
         recount. Moved requests are not moved again. Each move lowers sum(c_w^2) by at least
         2, so the loop terminates; at the end every worker still holding step-1 requests has
         c_w <= avg + 1.
      A restore with valid_prefix_tokens == 0 is a recompute in effect (nothing to load); it
      stays a restore at the holder in step 1 so that the holder's pages (which may still be
      arriving) are used, and it is the first candidate for shedding.
    fixed-ckpt: step 1 only.
    stop-restart / spec-only: each request through the normal router (`route_new`, counting
      earlier assignments), recompute.
    """
    pol = parse_policy(policy)
    reqs = sorted(interrupted, key=lambda r: r.id)
    if not reqs:
        return []
    workers = sorted(view.workers, key=lambda w: w.id)
    by_id = {w.id: w for w in workers}
    if not any(_eligible(w) for w in workers):
        raise NoServingWorker("no alive SERVING worker to take interrupted requests")

    extra: dict[int, int] = {}
    feats = features(pol)
    if not feats.locality_restore:
        out = []
        for r in reqs:
            t = _least_loaded(workers, extra)
            assert t is not None
            extra[t] = extra.get(t, 0) + 1
            out.append(Assignment(r.id, t, "recompute"))
        return out

    # step 1
    target: dict[int, int] = {}
    mode: dict[int, str] = {}
    for r in reqs:
        h = by_id.get(r.holder) if r.holder is not None else None
        if (h is not None and _eligible(h)
                and (r.holder_epoch is None or r.holder_epoch == h.epoch)):
            target[r.id], mode[r.id] = h.id, "restore"
        else:
            t = _least_loaded(workers, extra)
            assert t is not None
            target[r.id], mode[r.id] = t, "recompute"
        extra[target[r.id]] = extra.get(target[r.id], 0) + 1

    if feats.shedding:
        _shed(workers, reqs, target, mode, extra)
    return [Assignment(r.id, target[r.id], mode[r.id]) for r in reqs]  # type: ignore[arg-type]


def _shed(workers, reqs: Sequence[RequestView], target: dict[int, int], mode: dict[int, str],
          extra: dict[int, int]) -> None:
    serving = [w for w in workers if _eligible(w)]
    count = {w.id: w.waiting + w.running + extra.get(w.id, 0) for w in serving}
    avg = sum(count.values()) / len(count)   # moves keep the total, so avg is fixed
    # movable[w]: step-1 requests on w, shortest effective prefix first (ties by request id)
    movable: dict[int, list[tuple[int, int]]] = {}
    for r in reqs:
        prefix = r.valid_prefix_tokens if mode[r.id] == "restore" else 0
        movable.setdefault(target[r.id], []).append((prefix, r.id))
    for lst in movable.values():
        lst.sort(reverse=True)    # pop() from the end gives the shortest prefix
    while True:
        holders = [wid for wid, lst in movable.items() if lst]
        if not holders:
            return
        src = min(holders, key=lambda wid: (-count[wid], wid))
        dst = min(count, key=lambda wid: (count[wid], wid))
        if not (count[src] > avg and count[src] - 1 >= count[dst] + 1):
            return
        _, rid = movable[src].pop()
        target[rid], mode[rid] = dst, "recompute"
        count[src] -= 1
        count[dst] += 1
