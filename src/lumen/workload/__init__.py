"""Workloads: arrival processes, named length distributions, trace files.

Shared by ``lumen.bench`` (live load) and ``lumen.sim`` so both are driven the same way.
"""

from .arrivals import gamma_arrivals, poisson_arrivals
from .lengths import (
    LENGTH_DISTRIBUTIONS,
    FixedLengths,
    LengthDist,
    LognormalLengths,
    QuantileLengths,
    get_lengths,
)
from .spec import RequestSpec, make_workload
from .trace import TraceFormatError, load_trace

__all__ = [
    "RequestSpec",
    "make_workload",
    "poisson_arrivals",
    "gamma_arrivals",
    "LengthDist",
    "LognormalLengths",
    "QuantileLengths",
    "FixedLengths",
    "LENGTH_DISTRIBUTIONS",
    "get_lengths",
    "load_trace",
    "TraceFormatError",
]
