"""Mechanism 3 where it pays (DESIGN.md section 3, "Speculate only where it pays").

Three decisions, each a pure function that the live worker, the controller and the simulator share:

- `choose_spec_lengths`: how many draft tokens K_r in {0..K_max} the partner verifies for each mirrored
  request in its next step. Verify positions are handed out one at a time, each to the request whose next
  draft token is the most likely to be accepted (its (K_r + 1)-th token: alpha_r^(K_r + 1)), while the
  position pays:

      alpha_r^(K_r + 1) * T_dec  >  (D + Q) * dT

  An accepted token saves its request one decode step of the partner (T_dec = step_time(0, D, C), the
  plain decode part of the step); the position adds dT to the step, which delays every request that
  waits on the partner: its D decoding requests and its Q queued ones. Put as goodput: the position's
  expected tokens per second it adds must beat the partner's plain rate, (D + Q) requests served per
  T_dec, counting the queue's requests. Verify positions also never take chunk budget from prefill that
  is waiting: at most B - D - W positions, with B the step's token budget and W the queued prefill
  tokens. Zero for every request means no assistance this step.
- `pair_gain` / `pick_partner_by_gain`: the survivor whose next step the rule would gain most on
  (expected extra tokens per second).
- `draft_phase_pays`: whether a restarting worker reads its draft before its target.

The step-time model is the simulator's: any callable step_time(prefill_tokens, decode_positions,
context_tokens) -> seconds. `LinearStepTime` is its fitted form, `fit_step_time` fits it (the live
worker, from its own steps, as `lumen profile` does; the simulator, from a profile).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

StepTime = Callable[[int, int, float], float]

# a request's own accepted counts weigh as much as this many draft tokens of the prior
PRIOR_TOKENS = 8.0
MIN_PAIR_DWELL_S = 5.0  # a pair stays together at least this long before pairing by gain may move it


@dataclass(frozen=True)
class LinearStepTime:
    """t = c0 + c1*P + c2*D + c3*C + c4*P^2 + c5*S (P prefill tokens, D decode positions, C context
    tokens attended, S decoding sequences; S = D in a step without verify positions); 0 for an empty
    step. The simulator's fitted form is the same with c5 = 0 (its profiles have S = D throughout)."""

    coef: tuple[float, float, float, float, float]
    seq_coef: float = 0.0   # c5: per decoding sequence, beyond its positions (per-request work)

    def __call__(self, p: int, d: int, c: float, seqs: int | None = None) -> float:
        if p + d <= 0:
            return 0.0
        c0, c1, c2, c3, c4 = self.coef
        return c0 + c1 * p + c2 * d + c3 * c + c4 * p * p + self.seq_coef * (d if seqs is None else seqs)

    step_time = __call__

    def for_batch(self, seqs: int) -> StepTime:
        """The model as the rule calls it, for a step of `seqs` decoding sequences (verify positions
        added to them cost c2 each, not c2 + c5)."""
        return lambda p, d, c: self(p, d, c, seqs)


def step_features(p, d, c) -> np.ndarray:
    p, d, c = (np.asarray(x, dtype=np.float64) for x in (p, d, c))
    return np.stack([np.ones_like(p), p, d, c, p * p], axis=1)


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares in relative error (rows weighted by 1/t, so fast decode steps count
    as much as big prefills), columns scaled so P^2 does not swamp the rest; a column that never
    varies is the intercept's twin and gets 0 (it would take an arbitrary share of c0: one request
    decoding alone would make every step "cost" a position)."""
    from scipy.optimize import nnls

    x = x.copy()
    flat = np.ptp(x, axis=0) == 0
    flat[0] = False
    x[:, flat] = 0.0
    scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
    w = 1.0 / y
    sol, _ = nnls(x / scale * w[:, None], y * w)
    return sol / scale


def fit_step_time(rows: Iterable[Sequence[float]]) -> LinearStepTime:
    """Fit LinearStepTime to (P, D, C, t) rows, or (P, D, C, t, S) rows of live steps.

    Where no row has verify positions (D = S throughout), nothing tells a position's cost from a
    sequence's: a verify position is then priced as a prefill token (c2 = c1: both are one more token
    through the same layers, batched with others) and the rest of a decode step's cost goes to its
    sequences (c5). Otherwise all six are fitted."""
    a = np.asarray(list(rows), dtype=np.float64)
    if a.ndim != 2 or len(a) < 2 or a.shape[1] not in (4, 5):
        raise ValueError(f"need at least 2 step rows of 4 or 5 columns to fit, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a[:, 3] <= 0):
        raise ValueError("step rows must be finite with step_time_s > 0")
    p, d, c, y = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
    x = step_features(p, d, c)
    if a.shape[1] == 4:
        return LinearStepTime(tuple(float(v) for v in _nnls(x, y)))  # type: ignore[arg-type]
    seqs = a[:, 4]
    if np.any(d != seqs):
        sol = _nnls(np.column_stack([x, seqs]), y)
        return LinearStepTime(tuple(float(v) for v in sol[:5]), float(sol[5]))  # type: ignore[arg-type]
    c1 = float(_nnls(x, y)[1])  # the cost of a prefill token
    x[:, 2] = 0.0
    sol = _nnls(np.column_stack([x, seqs]), np.maximum(y - c1 * d, 1e-9 * y))
    return LinearStepTime((float(sol[0]), float(sol[1]), c1, float(sol[3]), float(sol[4])), float(sol[5]))


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step commits for a request with k draft tokens at per-token acceptance alpha:
    the accepted prefix plus the target's own token, (1 - alpha^(k+1)) / (1 - alpha)."""
    a = min(max(alpha, 0.0), 1.0)
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


class AcceptanceEstimate:
    """Per-token acceptance from verify outcomes: each verified draft token is a trial up to the first
    rejection (k proposed, a accepted: a successes and, if a < k, one failure), shrunk towards a prior
    worth `prior_tokens` trials."""

    __slots__ = ("prior", "prior_tokens", "accepted", "trials")

    def __init__(self, prior: float, prior_tokens: float = PRIOR_TOKENS):
        self.prior = min(max(float(prior), 0.0), 1.0)
        self.prior_tokens = prior_tokens
        self.accepted = 0
        self.trials = 0

    def update(self, proposed: int, accepted: int) -> None:
        if proposed <= 0:
            return
        accepted = min(max(accepted, 0), proposed)
        self.accepted += accepted
        self.trials += accepted + (1 if accepted < proposed else 0)

    @property
    def rate(self) -> float:
        return (self.prior * self.prior_tokens + self.accepted) / (self.prior_tokens + self.trials)


@dataclass(frozen=True)
class PartnerLoad:
    """What the partner's next step holds besides the verify positions."""

    decoding: int                 # decoding requests (mirrored or not): one position each
    context_tokens: float         # their context, summed
    # prompt tokens not yet computed that the step could schedule: running prefills and the waiting requests
    # the batch has room for (live: Engine.load_summary; the simulator: Simulator._load, the same count)
    queued_prefill_tokens: int
    queued_requests: int          # requests waiting for their first token
    chunk_tokens: int             # the step's token budget

    def verify_budget(self) -> int:
        """Verify positions the step can spare without taking budget from waiting prefill."""
        return max(0, self.chunk_tokens - self.decoding - self.queued_prefill_tokens)

    def prefill_this_step(self) -> int:
        return min(self.queued_prefill_tokens, max(0, self.chunk_tokens - self.decoding))


def choose_spec_lengths(acceptance: Sequence[float], load: PartnerLoad, step_time: StepTime,
                        k_max: int) -> list[int]:
    """K_r for each mirrored request (in the order given), by the rule of the module docstring.
    Ties go to the earlier request. `acceptance` holds the mirrored requests' estimates (at most
    `load.decoding` of them: they are among the decoding requests)."""
    n = len(acceptance)
    ks = [0] * n
    budget = load.verify_budget()
    if n == 0 or k_max <= 0 or budget <= 0:
        return ks
    d = max(load.decoding, n)
    c = load.context_tokens
    t_dec = step_time(0, d, c)
    users = d + max(0, load.queued_requests)
    p = load.prefill_this_step()
    alphas = [min(max(float(a), 0.0), 1.0) for a in acceptance]
    heap = [(-a, i) for i, a in enumerate(alphas) if a > 0.0]
    heapq.heapify(heap)
    used = 0
    t_prev = step_time(p, d, c)
    while heap and used < budget:
        neg_gain, i = heapq.heappop(heap)
        t_next = step_time(p, d + used + 1, c)
        # the best remaining position does not pay: none after it does (gains only fall, and the
        # step's marginal cost does not fall for a convex step-time model)
        if -neg_gain * t_dec <= users * (t_next - t_prev):
            break
        ks[i] += 1
        used += 1
        t_prev = t_next
        if ks[i] < k_max:
            heapq.heappush(heap, (-(alphas[i] ** (ks[i] + 1)), i))
    return ks


def assist_gain(acceptance: Sequence[float], load: PartnerLoad, step_time: StepTime, k_max: int) -> float:
    """Expected extra tokens per second the partner commits in its next step under the rule (0: no gain)."""
    ks = choose_spec_lengths(acceptance, load, step_time, k_max)
    extra = sum(expected_tokens(a, k) - 1.0 for a, k in zip(acceptance, ks, strict=True) if k)
    if extra <= 0:
        return 0.0
    d = max(load.decoding, len(acceptance))
    t = step_time(load.prefill_this_step(), d + sum(ks), load.context_tokens)
    return extra / t if t > 0 else 0.0


def pairing_gain(acceptance: Sequence[float], load: PartnerLoad, step_time: StepTime, k_max: int) -> float:
    """What pairing with this partner gains: `assist_gain` over the steps its prefill queue leaves free.
    A pair lasts seconds and a queue that fills one step's budget is gone a few steps later; priced on
    that one step, a busy partner's gain blinked to 0, and pairs moved away every ~6 s (58 of 64 moves at
    30 QPS in the simulator, 2026-12-07), each move costing the draft a catch-up prefill. The queued
    requests still weigh in the price of a position (Q), and the per-step rule still gives K = 0 while
    the queue fills a step."""
    return assist_gain(acceptance, replace(load, queued_prefill_tokens=0), step_time, k_max)


def pick_by_gain(gains: dict[int, float], current: int | None = None, margin: float = 1.25,
                 paired_for_s: float = math.inf, min_dwell_s: float = MIN_PAIR_DWELL_S) -> int | None:
    """The candidate with the highest gain (ties to the lowest id); None if no gain is positive. A
    current partner is kept for at least `min_dwell_s` of pairing, and after that unless another's
    gain exceeds its own by `margin`: a move costs the draft a catch-up prefill of the new partner's
    contexts, and a partner's instantaneous gain drops to 0 whenever its queue fills a step (checked
    every second, the simulator's pairs moved every ~2 s and assisted a quarter as many steps)."""
    if current is not None and current in gains and paired_for_s < min_dwell_s:
        return current
    best = None
    for wid in sorted(gains):
        if gains[wid] > 0.0 and (best is None or gains[wid] > gains[best]):
            best = wid
    if current is not None and current in gains and gains[current] > 0.0:
        if best is None or gains[best] <= margin * gains[current]:
            return current
    return best


def draft_phase_pays(draft_read_s: float, target_read_s: float, assist_gain_per_s: float,
                     displaced_tokens_per_s: float) -> bool:
    """Whether a restarting worker reads its draft before its target.

    Reading the draft first (from disk: one disk, so the target's read starts `draft_read_s` later)
    lets it assist for about the target's read, and postpones the worker's own serving by
    `draft_read_s`. It pays when the expected extra tokens of the assistance
    (assist_gain_per_s x target_read_s) exceed the tokens the worker would have served meanwhile
    (displaced_tokens_per_s x draft_read_s, its rate once back). A draft resident in host memory
    (draft_read_s = 0) costs the target nothing: it always pays if it gains at all."""
    if assist_gain_per_s <= 0.0 or not math.isfinite(assist_gain_per_s):
        return False
    if draft_read_s <= 0.0:
        return True
    return assist_gain_per_s * max(0.0, target_read_s) > max(0.0, displaced_tokens_per_s) * draft_read_s
