"""Checkpoint placement (DESIGN.md section 3, "Placement")."""

from __future__ import annotations

from .names import Policy, parse_policy
from .states import WorkerState
from .view import ClusterView

_SERVING = WorkerState.SERVING


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

    The caller reserves `reservation_bytes` on the result and releases it when the request
    finishes or moves.
    """
    pol = parse_policy(policy)
    s = reservation_bytes
    if pol is Policy.FIXED_CKPT:
        return _ring_next(view, executor, s)
    if pol not in (Policy.LUMEN, Policy.LUMEN_NO_SPEC):
        return None
    lam = view.lam
    exec_node = None
    for w in view.workers:
        if w.id == executor:
            exec_node = w.node
            break
    # (same_node, score, id): lexicographic min gives node preference, then objective, then id.
    best: tuple[bool, float, int] | None = None
    for w in view.workers:
        if w.id == executor or not w.alive or w.state != _SERVING:
            continue
        if w.ckpt_budget_bytes - w.ckpt_reserved_bytes < s:
            continue
        key = (exec_node is not None and w.node == exec_node,
               w.q_wait_s + lam * (w.ckpt_reserved_bytes + s) / w.h2d_bytes_per_s,
               w.id)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]


def _ring_next(view: ClusterView, executor: int, s: int) -> int | None:
    ring = sorted((w for w in view.workers if w.id != executor), key=lambda w: w.id)
    if not ring:
        return None
    # rotate so the ring starts just after the executor's id
    start = next((i for i, w in enumerate(ring) if w.id > executor), 0)
    for w in ring[start:] + ring[:start]:
        if w.alive and w.state == _SERVING:
            return w.id if w.ckpt_budget_bytes - w.ckpt_reserved_bytes >= s else None
    return None
