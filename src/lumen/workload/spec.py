"""Request specs and synthetic workload construction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrivals import gamma_arrivals, poisson_arrivals
from .lengths import LengthDist, get_lengths

__all__ = ["RequestSpec", "make_workload"]


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: when (seconds from the start of the run) and how long."""

    req_id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int


def make_workload(
    n: int,
    qps: float,
    lengths: str | LengthDist = "sharegpt",
    seed: int = 0,
    arrival: str = "poisson",
    burstiness: float = 1.0,
    max_prompt: int | None = None,
    max_output: int | None = None,
    min_prompt: int = 1,
    min_output: int = 1,
) -> list[RequestSpec]:
    """Build ``n`` requests at ``qps`` with lengths from a named distribution.

    ``arrival`` is ``"poisson"`` or ``"gamma"`` (with ``burstiness`` = CV² of the gaps).
    Lengths are clipped to [min, max]. Arrivals and lengths use independent random streams
    spawned from ``seed``, so changing ``qps`` or the arrival process leaves the lengths of
    every request unchanged (and vice versa): runs that differ in one knob stay comparable.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if min_prompt < 1 or min_output < 1:
        raise ValueError("min_prompt and min_output must be >= 1")
    if max_prompt is not None and max_prompt < min_prompt:
        raise ValueError(f"max_prompt ({max_prompt}) < min_prompt ({min_prompt})")
    if max_output is not None and max_output < min_output:
        raise ValueError(f"max_output ({max_output}) < min_output ({min_output})")
    dist = get_lengths(lengths)
    arr_ss, len_ss = np.random.SeedSequence(seed).spawn(2)
    arr_rng, len_rng = np.random.default_rng(arr_ss), np.random.default_rng(len_ss)
    kind = arrival.lower()
    if kind == "poisson":
        if burstiness != 1.0:
            raise ValueError("burstiness applies to arrival='gamma' only (Poisson has CV^2 = 1)")
        times = poisson_arrivals(qps, n, arr_rng)
    elif kind == "gamma":
        times = gamma_arrivals(qps, n, arr_rng, burstiness)
    else:
        raise ValueError(f"unknown arrival process {arrival!r}; choose 'poisson' or 'gamma'")
    prompts, outputs = dist.sample(n, len_rng)
    prompts = np.clip(prompts, min_prompt, max_prompt)
    outputs = np.clip(outputs, min_output, max_output)
    return [
        RequestSpec(i, float(t), int(p), int(o))
        for i, (t, p, o) in enumerate(zip(times, prompts, outputs, strict=True))
    ]
