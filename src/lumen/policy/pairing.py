"""Pairing a recovering worker with a survivor to assist (DESIGN.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .view import ClusterView, Columns


def _best_partner(c: Columns, recovering_id: int, taken: np.ndarray | None) -> int | None:
    mask = c.eligible() & ~c.partnered
    i = c.idx(recovering_id)
    if i is not None:
        mask[i] = False
    if taken is not None:
        mask &= ~taken
    if not mask.any():
        return None
    # argmax returns the first maximum: ties to the lowest id
    return int(np.where(mask, c.q, -np.inf).argmax())


def pick_partner(view: ClusterView, recovering_id: int) -> int | None:
    """The SERVING worker with the highest q_wait_s that has no partner (pairing is 1:1),
    ties to the lowest id; None if every SERVING worker is already paired (the recovering worker
    then skips ASSISTING). The caller records the pair on both sides (`partner`) before the
    next call, so two recovering workers never get the same partner."""
    c = view.columns
    i = _best_partner(c, recovering_id, None)
    return None if i is None else int(c.ids[i])


def pair_recovering(view: ClusterView, recovering_ids: Sequence[int]) -> dict[int, int | None]:
    """Pairs several recovering workers at once (simultaneous failures), in ascending id order,
    each taking the best partner the previous ones left: `pick_partner` applied in sequence."""
    c = view.columns
    taken = np.zeros(len(c), dtype=bool)
    out: dict[int, int | None] = {}
    for rid in sorted(recovering_ids):
        i = _best_partner(c, rid, taken)
        out[rid] = None if i is None else int(c.ids[i])
        if i is not None:
            taken[i] = True
    return out
