"""Checkpoint placement (DESIGN.md section 3, "Placement")."""

from __future__ import annotations

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
    finishes or moves.
    """
    pol = parse_policy(policy)
    if pol is Policy.FIXED_CKPT:
        return _ring_next(view, executor, reservation_bytes)
    if pol not in (Policy.LUMEN, Policy.LUMEN_NO_SPEC):
        return None
    c = view.columns
    s = reservation_bytes
    mask = c.eligible() & (c.budget - c.reserved >= s)
    ex = c.idx(executor)
    if ex is not None:
        mask[ex] = False
    if not mask.any():
        return None
    if ex is not None and c.node[ex] >= 0:
        off = mask & (c.node != c.node[ex])
        if off.any():
            mask = off
    score = c.q + view.lam * (c.reserved + s) / c.h2d
    # argmin returns the first minimum: workers are in id order, so ties go to the lowest id
    return int(c.ids[int(np.where(mask, score, np.inf).argmin())])


def _ring_next(view: ClusterView, executor: int, s: int) -> int | None:
    c = view.columns
    n = len(c)
    if n == 0:
        return None
    start = int(np.searchsorted(c.ids, executor, side="right"))
    order = np.concatenate((np.arange(start, n), np.arange(0, start)))
    elig = c.eligible()
    cand = order[elig[order] & (c.ids[order] != executor)]
    if cand.size == 0:
        return None
    i = int(cand[0])
    return int(c.ids[i]) if c.budget[i] - c.reserved[i] >= s else None
