"""Pairing a recovering worker with a survivor to assist (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .states import WorkerState
from .view import ClusterView

_SERVING = WorkerState.SERVING


def _best_partner(view: ClusterView, recovering_id: int, taken: Collection[int]) -> int | None:
    best: tuple[float, int] | None = None
    for w in view.workers:
        if (w.id == recovering_id or w.id in taken or not w.alive or w.state != _SERVING
                or w.partner is not None):
            continue
        key = (-w.q_wait_s, w.id)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def pick_partner(view: ClusterView, recovering_id: int) -> int | None:
    """The SERVING worker with the highest q_wait_s that has no partner (pairing is 1:1),
    ties to the lowest id; None if every SERVING worker is already paired (the recovering worker
    then skips ASSISTING). The caller records the pair on both sides (`partner`) before the
    next call, so two recovering workers never get the same partner."""
    return _best_partner(view, recovering_id, ())


def pair_recovering(view: ClusterView, recovering_ids: Sequence[int]) -> dict[int, int | None]:
    """Pairs several recovering workers at once (simultaneous failures), in ascending id order,
    each taking the best partner the previous ones left: `pick_partner` applied in sequence."""
    taken: set[int] = set()
    out: dict[int, int | None] = {}
    for rid in sorted(recovering_ids):
        p = _best_partner(view, rid, taken)
        out[rid] = p
        if p is not None:
            taken.add(p)
    return out
