"""Pairing a recovering worker with a survivor to assist (DESIGN.md section 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .speculation import pick_by_gain
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


def pick_partner_by_gain(view: ClusterView, recovering_id: int, gains: dict[int, float],
                         current: int | None = None, paired_for_s: float = math.inf) -> int | None:
    """Pairing by gain (issue 24): among the SERVING workers free to pair (or `current`, the recovering
    worker's partner now), the one whose expected gain from assistance (`speculation.assist_gain`:
    extra tokens per second of its steps) is highest; ties to the lowest id. `current` is kept unless
    another gains clearly more, and never within its first seconds (`speculation.pick_by_gain`). None: no positive gain anywhere, so the
    worker does not assist now (it keeps its draft and is asked again as loads change)."""
    c = view.columns
    mask = c.eligible() & ~c.partnered
    i = c.idx(recovering_id)
    if i is not None:
        mask[i] = False
    free = {int(c.ids[j]) for j in np.flatnonzero(mask)}
    if current is not None:
        free.add(current)
    return pick_by_gain({wid: g for wid, g in gains.items() if wid in free}, current=current,
                        paired_for_s=paired_for_s)


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
