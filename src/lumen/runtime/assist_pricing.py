"""The controller's inputs to mechanism 3's policy decisions, read from the workers' heartbeat stats.

Each serving worker publishes the load of its next step (`load_*`, `chunk_tokens`) and its fitted
step-time model (`step_c0..4`, runtime.steptime). From them the controller asks `lumen.policy` what
assisting each one would gain (pairing by gain) and whether a restart's draft read pays; the
decisions themselves are the policy's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from ..policy import LinearStepTime, PartnerLoad, draft_phase_pays, pairing_gain
from .protocol import MAX_MIRRORED


def _num(stats: dict, key: str) -> float | None:
    v = stats.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def step_model(stats: dict) -> LinearStepTime | None:
    coef = [_num(stats, f"step_c{i}") for i in range(6)]
    if any(c is None for c in coef):
        return None
    return LinearStepTime(tuple(coef[:5]), coef[5])  # type: ignore[arg-type]


def partner_load(stats: dict) -> PartnerLoad | None:
    vals = [_num(stats, k) for k in ("load_decoding", "load_context_tokens", "load_queued_tokens",
                                     "load_queued_requests", "chunk_tokens")]
    if any(v is None for v in vals):
        return None
    d, c, qt, qr, chunk = vals
    return PartnerLoad(int(d), c, int(qt), int(qr), int(chunk))  # type: ignore[arg-type]


def acceptance_of(stats: dict, prior: float) -> float:
    """The worker's measured acceptance where it has verified drafts, else the pair's prior."""
    rate = _num(stats, "spec_acceptance")
    return rate if rate is not None and (_num(stats, "spec_draft_tokens") or 0) > 0 else prior


def gain_of(stats: dict, prior: float, k_max: int) -> float | None:
    """Expected extra tokens per second from assisting this worker (`policy.pairing_gain`); None where
    its stats do not say yet (no fitted model)."""
    model, load = step_model(stats), partner_load(stats)
    if model is None or load is None:
        return None
    n = min(load.decoding, MAX_MIRRORED)
    return pairing_gain([acceptance_of(stats, prior)] * n, load, model.for_batch(load.decoding), k_max)


def gains(workers: Iterable[tuple[int, dict]], prior: float, k_max: int) -> dict[int, float] | None:
    """Gain per serving worker (id, stats); None if any of them cannot be priced yet."""
    out: dict[int, float] = {}
    for wid, stats in workers:
        g = gain_of(stats, prior, k_max)
        if g is None:
            return None
        out[wid] = g
    return out


def plain_rate(stats: dict) -> float:
    """Tokens per second a worker's plain decode steps commit at its load now (0 if unknown)."""
    model, load = step_model(stats), partner_load(stats)
    if model is None or load is None or load.decoding <= 0:
        return 0.0
    t = model(0, load.decoding, load.context_tokens)
    return load.decoding / t if t > 0 else 0.0


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of a model's weight files (links followed)."""
    d = Path(model_dir)
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.is_dir() else 0


def draft_first(best_gain: float, draft_bytes: int, target_bytes: int, disk_bytes_per_s: float,
                displaced_tokens_per_s: float) -> bool:
    """Whether a restart whose draft is not resident reads the draft before its target."""
    if disk_bytes_per_s <= 0:  # no measured load to go by: the draft's cost unknown, its gain decides
        return best_gain > 0
    return draft_phase_pays(draft_bytes / disk_bytes_per_s, target_bytes / disk_bytes_per_s, best_gain,
                            displaced_tokens_per_s)
