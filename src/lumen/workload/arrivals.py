"""Request arrival processes.

All functions return absolute arrival times in seconds, starting at 0.0 for the first request
(the first request is sent immediately, as vLLM's benchmark client does), strictly
non-decreasing, as a float64 numpy array of length ``n``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["poisson_arrivals", "gamma_arrivals"]


def _check(qps: float, n: int) -> None:
    if not (qps > 0 and np.isfinite(qps)):
        raise ValueError(f"qps must be a positive finite number, got {qps!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    # n gaps were drawn; the first request goes at t=0 and the last gap is unused, so the
    # sequence of inter-arrival times is the first n-1 draws.
    out = np.zeros(len(gaps), dtype=np.float64)
    if len(gaps) > 1:
        np.cumsum(gaps[:-1], out=out[1:])
    return out


def poisson_arrivals(qps: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson process of rate ``qps``: i.i.d. exponential inter-arrival times, mean 1/qps."""
    _check(qps, n)
    return _from_gaps(rng.exponential(1.0 / qps, size=n))


def gamma_arrivals(qps: float, n: int, rng: np.random.Generator, burstiness: float = 1.0) -> np.ndarray:
    """Gamma renewal process of rate ``qps``.

    ``burstiness`` is the squared coefficient of variation (CV²) of the inter-arrival times:
    1.0 is exactly Poisson, > 1 burstier, < 1 more regular. Gaps ~ Gamma(shape=1/CV²,
    scale=CV²/qps), so the mean gap is 1/qps whatever the burstiness.
    """
    _check(qps, n)
    if not (burstiness > 0 and np.isfinite(burstiness)):
        raise ValueError(f"burstiness (CV^2) must be positive and finite, got {burstiness!r}")
    shape = 1.0 / burstiness
    return _from_gaps(rng.gamma(shape, burstiness / qps, size=n))
