"""Checkpoint placement (DESIGN.md section 3, "Placement"): one holder per request
(`place_checkpoint`, the paper's rule) or K holders spread over failure domains (`place_checkpoints`,
issue 25; docs/replicas.md)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .names import Policy, parse_policy
from .view import ClusterView


def checkpoint_reservation(prompt_tokens: int, max_tokens: int, kv_bytes_per_token: int,
                           page_tokens: int) -> int:
    """s_r: host bytes reserved for one request's checkpoint, sized for its maximum context
    (prompt + max_tokens) and rounded up to whole pages, so a holder never overflows later."""
    if prompt_tokens < 0 or max_tokens < 0 or kv_bytes_per_token < 0:
        raise ValueError("token counts and bytes per token must be >= 0")
    if page_tokens <= 0:
        raise ValueError("page_tokens must be > 0")
    pages = -(-(prompt_tokens + max_tokens) // page_tokens)
    return pages * page_tokens * kv_bytes_per_token


def place_checkpoint(view: ClusterView, policy: str | Policy, executor: int,
                     reservation_bytes: int) -> int | None:
    """The holder for a request executing on `executor`, or None (run unprotected).

    lumen / lumen-no-spec: argmin over SERVING workers w != executor with free_w >= s of
        q_w + lam * (R_w + s) / B_h2d(w),  ties to the lowest id.
      Node awareness: if the executor's node is known and some fitting candidate is on a
      different node, only those are considered (a node failure would take a same-node holder
      down with the executor, which is the one case a single replica cannot survive). Candidates
      whose node is unknown count as "different".
    fixed-ckpt: the next SERVING worker after the executor in ring order (ascending id, wrapping);
      if that one has no room, None (DejaVu has no fallback; load-blind by design).
    stop-restart / spec-only: None.

    Only SERVING workers hold checkpoints: a holder must be able to restore on its own device.
    The caller reserves `reservation_bytes` on the result and releases it when the request
    finishes or moves. One holder is `place_checkpoints` with k = 1 (one implementation of the rule).
    """
    holders = place_checkpoints(view, policy, executor, reservation_bytes, 1)
    return holders[0] if holders else None


def place_checkpoints(view: ClusterView, policy: str | Policy, executor: int, reservation_bytes: int,
                      k: int, existing: Iterable[int] = ()) -> list[int]:
    """K holders for a request executing on `executor` (issue 25): up to `k` distinct workers, in the
    order chosen; fewer (possibly none) when fewer fit. `existing`: holders that already keep a copy
    of this request (re-protection after a holder died asks for the missing copies only): they are
    never chosen again and their failure domains count as occupied.

    A failure domain is the view's `node` column (node by default; the caller may label racks
    instead); a worker of unknown node is a domain of its own.

    lumen / lumen-no-spec: every holder is a SERVING worker w != executor with free_w >= s (each
    copy reserves s on its own holder; choosing one holder changes no other's cost or room). Copies
    are chosen one at a time; each is the candidate with the smallest key
        (occupancy of its domain, its domain is the executor's, q_w + lam * (R_w + s) / B_h2d(w), id)
    where the occupancy of a domain counts the executor and the holders chosen (or existing) in it.
    So copies go to domains holding nothing of the request first, outside the executor's domain
    before inside it, and a domain gets a second copy only when every domain that fits holds as
    many; within that, the load-aware cost of `place_checkpoint`, ties to the lowest id. With k = 1
    and no `existing` this is exactly `[place_checkpoint(...)]` (or [] for None).
    fixed-ckpt: the next k SERVING workers after the executor in ring order (ascending id, wrapping),
      skipping `existing`; those without room are dropped, not replaced (load- and domain-blind, as
      DejaVu; k = 1 is `place_checkpoint`'s ring neighbour).
    stop-restart / spec-only, or k <= 0: [].

    The caller reserves `reservation_bytes` on every holder returned and releases each when the
    request finishes or moves, or when that holder dies.
    """
    pol = parse_policy(policy)
    if k <= 0:
        return []
    existing = {int(e) for e in existing}
    if pol is Policy.FIXED_CKPT:
        return _ring_take(view, executor, reservation_bytes, k, existing)
    if pol not in (Policy.LUMEN, Policy.LUMEN_NO_SPEC):
        return []
    c = view.columns
    s = reservation_bytes
    mask, ex = _fitting_holders(c, executor, s)
    occ = np.zeros(len(c), dtype=np.int64)      # occupancy of each worker's domain
    ex_dom = np.zeros(len(c), dtype=bool)       # in the executor's domain
    for i in [ex] + [c.idx(e) for e in existing]:
        if i is None:
            continue
        if i != ex:
            mask[i] = False
        if c.node[i] >= 0:
            occ[c.node == c.node[i]] += 1
        else:
            occ[i] += 1
    if ex is not None and c.node[ex] >= 0:
        ex_dom = c.node == c.node[ex]
    score = c.q + view.lam * (c.reserved + s) / c.h2d
    out: list[int] = []
    while len(out) < k and mask.any():
        m = mask.copy()
        o = np.where(m, occ, np.iinfo(np.int64).max)
        m &= o == o.min()
        if (m & ~ex_dom).any():
            m &= ~ex_dom
        i = int(np.where(m, score, np.inf).argmin())   # first minimum: ties to the lowest id
        out.append(int(c.ids[i]))
        mask[i] = False
        if c.node[i] >= 0:
            occ[c.node == c.node[i]] += 1
        else:
            occ[i] += 1
    return out


def _ring_take(view: ClusterView, executor: int, s: int, k: int, existing: set[int]) -> list[int]:
    c = view.columns
    n = len(c)
    if n == 0:
        return []
    start = int(np.searchsorted(c.ids, executor, side="right"))
    order = np.concatenate((np.arange(start, n), np.arange(0, start)))
    elig = c.eligible()
    ids = c.ids[order]
    keep = elig[order] & (ids != executor) & ~np.isin(ids, list(existing))
    cand = order[keep][:k]
    return [int(c.ids[i]) for i in cand if c.budget[i] - c.reserved[i] >= s]


def _fitting_holders(c, executor: int, s: int) -> tuple[np.ndarray, int | None]:
    """Which workers may hold a copy of s bytes for a request on `executor` (SERVING, room for it, not
    the executor), and the executor's index (None: not in the view)."""
    mask = c.eligible() & (c.budget - c.reserved >= s)
    ex = c.idx(executor)
    if ex is not None:
        mask[ex] = False
    return mask, ex
