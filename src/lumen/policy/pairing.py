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


def may_assist(view: ClusterView, recovering_id: int) -> bool:
    """Whether a restarting worker loads a draft and assists (mechanism 3) at all: only where its GPU
    is its own. The paper's restarted worker has an idle GPU while its target loads; on a GPU shared
    with serving workers the draft's steps take GPU time from them, and its read delays the reload
    (lumen behind lumen-no-spec on 2x and 1x H200 with workers sharing GPUs, 2026-11-28 and 12-03).
    Workers without an `accelerator` (CPU, or unknown) count as owning theirs."""
    me = next((w for w in view.workers if w.id == recovering_id), None)
    if me is None or me.accelerator is None:
        return True
    return not any(w.id != me.id and w.alive and w.accelerator == me.accelerator and w.node == me.node
                   for w in view.workers)


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
