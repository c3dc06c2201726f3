"""Per-request measurements and the per-request metrics of DESIGN.md §6."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["RequestRecord", "with_worker", "ttft", "tpot", "e2e", "mean", "p99", "percentile"]


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request, all times in seconds on one clock (the run's clock).

    ``arrival`` is the request's scheduled arrival (open-loop: the time it was due, so client
    back-pressure counts against TTFT rather than hiding it). ``first_token`` / ``finish`` are
    None when the request never got that far. ``output_tokens`` is the number of tokens
    actually received. ``error`` is None for a request that completed normally; requests that
    received their first token keep their TTFT even if they failed later. ``interrupted`` marks a
    request that was running on a worker when that worker failed. ``workers``: the ids of the workers
    that produced its tokens, in order, without repeats in a row (the first produced its first token,
    the last its last one); None where the server did not say (not lumen, or results from before).
    """

    req_id: int
    arrival: float
    first_token: float | None
    finish: float | None
    prompt_tokens: int
    output_tokens: int
    interrupted: bool = False
    error: str | None = None
    token_times: list[float] | None = None
    workers: list[int] | None = None

    def to_dict(self) -> dict:
        return {
            "req_id": self.req_id,
            "arrival": self.arrival,
            "first_token": self.first_token,
            "finish": self.finish,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "interrupted": self.interrupted,
            "error": self.error,
            "workers": self.workers,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        return cls(
            req_id=int(d["req_id"]),
            arrival=float(d["arrival"]),
            first_token=None if d.get("first_token") is None else float(d["first_token"]),
            finish=None if d.get("finish") is None else float(d["finish"]),
            prompt_tokens=int(d["prompt_tokens"]),
            output_tokens=int(d["output_tokens"]),
            interrupted=bool(d.get("interrupted", False)),
            error=d.get("error"),
            token_times=d.get("token_times"),
            workers=None if d.get("workers") is None else [int(w) for w in d["workers"]],
        )


def with_worker(workers: list[int] | None, worker: int) -> list[int]:
    """``workers`` (a record's ``workers``) with ``worker`` appended, unless it is already the last one."""
    if workers is None:
        return [worker]
    if workers[-1] != worker:
        workers.append(worker)
    return workers


def ttft(r: RequestRecord) -> float:
    """Time to first token = first token − arrival; NaN when no token arrived."""
    if r.first_token is None:
        return math.nan
    return r.first_token - r.arrival


def tpot(r: RequestRecord) -> float:
    """Time per output token = (finish − first token) / (output tokens − 1).

    NaN for failed requests (``error`` set: their finish time is not a completion) and for
    requests with fewer than 2 output tokens (the quotient is undefined).
    """
    if r.error is not None or r.first_token is None or r.finish is None or r.output_tokens < 2:
        return math.nan
    return (r.finish - r.first_token) / (r.output_tokens - 1)


def e2e(r: RequestRecord) -> float:
    """End-to-end latency = finish − arrival, for completed requests; NaN otherwise."""
    if r.error is not None or r.finish is None:
        return math.nan
    return r.finish - r.arrival


def _finite(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values), dtype=np.float64)
    return a[np.isfinite(a)]


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    a = _finite(values)
    return float(a.mean()) if a.size else math.nan


def percentile(values: Iterable[float], q: float) -> float:
    """q-th percentile (linear interpolation) of the finite values; NaN when there are none."""
    a = _finite(values)
    return float(np.percentile(a, q)) if a.size else math.nan


def p99(values: Sequence[float] | Iterable[float]) -> float:
    return percentile(values, 99.0)
