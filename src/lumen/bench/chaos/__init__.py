"""``lumen chaos``: random faults under steady load; nothing may be lost (see run.py)."""

from .observe import process_stats
from .planner import FAULT_KINDS, FaultPlanner
from .run import ChaosConfig, ChaosReport, Fault, classify_outcome, run_chaos, run_chaos_async

__all__ = ["ChaosConfig", "ChaosReport", "Fault", "FAULT_KINDS", "FaultPlanner", "process_stats", "run_chaos",
           "run_chaos_async", "classify_outcome"]
