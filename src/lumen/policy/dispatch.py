"""Routing of new requests and recovery dispatch (DESIGN.md section 3, "Recovery dispatch")."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .names import Policy, features, parse_policy
from .view import Assignment, ClusterView, Columns, NoServingWorker, RequestView

_BIG = np.iinfo(np.int64).max


def route_new(view: ClusterView, *, by: Literal["count", "wait"] = "count") -> int | None:
    """The router for new requests, under every policy: least outstanding work among SERVING
    workers (waiting + running; `by="wait"` orders by q_wait_s first, then the count), ties to
    the lowest id. None when no worker is SERVING (the caller queues or rejects)."""
    c = view.columns
    elig = c.eligible()
    if not elig.any():
        return None
    load = c.waiting + c.running
    if by == "wait":
        qm = np.where(elig, c.q, np.inf)
        elig = qm == qm.min()
    return int(c.ids[int(np.where(elig, load, _BIG).argmin())])


class _LeastLoaded:
    """argmin over SERVING workers of (count, id) where counts only change through `add`:
    a lazy heap, so a dispatch of m requests costs O((W + m) log W), not O(m W)."""

    def __init__(self, c: Columns, count: np.ndarray):
        self.count = {int(i): int(count[i]) for i in np.flatnonzero(c.eligible())}
        self.heap = [(v, i) for i, v in self.count.items()]
        heapq.heapify(self.heap)

    def add(self, i: int, delta: int) -> None:
        self.count[i] += delta
        heapq.heappush(self.heap, (self.count[i], i))

    def argmin(self) -> tuple[int, int]:
        heap, count = self.heap, self.count
        while heap[0][0] != count[heap[0][1]]:
            heapq.heappop(heap)          # stale entry from before an add
        v, i = heap[0]
        return i, v


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
         c_w <= avg + 1. Ties: most loaded -> lowest id; least loaded -> lowest id.
      A restore with valid_prefix_tokens == 0 is a recompute in effect (nothing to load); it
      stays a restore at the holder in step 1 so that the holder's pages (which may still be
      arriving) are used, and it is the first candidate for shedding.
    fixed-ckpt: step 1 only.
    stop-restart / spec-only: each request through the normal router (`route_new`'s rule,
      counting earlier assignments), recompute.
    """
    pol = parse_policy(policy)
    reqs = sorted(interrupted, key=lambda r: r.id)
    if not reqs:
        return []
    c = view.columns
    elig = c.eligible()
    if not elig.any():
        raise NoServingWorker("no alive SERVING worker to take interrupted requests")
    ll = _LeastLoaded(c, c.waiting + c.running)
    feats = features(pol)
    ids = c.ids
    target: dict[int, int] = {}     # request id -> worker index
    mode: dict[int, str] = {}
    for r in reqs:
        h = c.idx(r.holder) if feats.locality_restore else None
        if (h is not None and elig[h]
                and (r.holder_epoch is None or r.holder_epoch == int(c.epoch[h]))):
            target[r.id], mode[r.id] = h, "restore"
        else:
            target[r.id], mode[r.id] = ll.argmin()[0], "recompute"
        ll.add(target[r.id], 1)

    if feats.shedding:
        _shed(ll, reqs, target, mode)
    return [Assignment(r.id, int(ids[target[r.id]]), mode[r.id]) for r in reqs]  # type: ignore[arg-type]


def _shed(ll: _LeastLoaded, reqs: Sequence[RequestView], target: dict[int, int],
          mode: dict[int, str]) -> None:
    count = ll.count
    avg = sum(count.values()) / len(count)   # moves keep the total, so avg is fixed
    # movable[w]: step-1 requests on w, shortest effective prefix first (ties by request id)
    movable: dict[int, list[tuple[int, int]]] = {}
    for r in reqs:
        prefix = r.valid_prefix_tokens if mode[r.id] == "restore" else 0
        movable.setdefault(target[r.id], []).append((prefix, r.id))
    for lst in movable.values():
        lst.sort(reverse=True)    # pop() from the end gives the shortest prefix
    # most loaded holder of movable requests: lazy max-heap of (-count, index)
    top = [(-count[w], w) for w in movable]
    heapq.heapify(top)
    while top:
        negc, src = top[0]
        if -negc != count[src] or not movable[src]:
            heapq.heappop(top)           # stale, or nothing left to move
            continue
        dst, cmin = ll.argmin()
        if not (count[src] > avg and count[src] - 1 >= cmin + 1):
            return
        _, rid = movable[src].pop()
        target[rid], mode[rid] = dst, "recompute"
        ll.add(src, -1)
        ll.add(dst, 1)
        heapq.heappush(top, (-count[src], src))
        if movable.get(dst):             # dst may hold step-1 requests of its own
            heapq.heappush(top, (-count[dst], dst))
