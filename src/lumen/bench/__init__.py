"""``lumen bench``: live load, real failure injection, repeats with confidence intervals."""

from .client import ClientConfig, LoadClient, prompt_token_ids, replay
from .cluster import ClusterProcess, ClusterStartError, free_port, serve_command, wait_ready
from .faults import FaultEvent, FaultInjectionError, FaultSpec, parse_fail_plan, parse_fault, run_plan
from .runner import BenchConfig, BenchResults, RunResult, run_bench, run_bench_async

__all__ = [
    "ClientConfig",
    "LoadClient",
    "prompt_token_ids",
    "replay",
    "ClusterProcess",
    "ClusterStartError",
    "free_port",
    "serve_command",
    "wait_ready",
    "FaultSpec",
    "FaultEvent",
    "FaultInjectionError",
    "parse_fault",
    "parse_fail_plan",
    "run_plan",
    "BenchConfig",
    "BenchResults",
    "RunResult",
    "run_bench",
    "run_bench_async",
]
