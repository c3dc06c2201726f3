"""lumen.sim: discrete-event simulator of a lumen cluster on the shared `lumen.policy` code.

    from lumen.sim import SimConfig, FailurePlan, FailureSpec, simulate, run_experiment, WorkloadSpec
    cfg = SimConfig(workers=10, model="llama-3-70b", device="a100", tp=4)      # the paper's setup
    res = simulate(cfg, make_workload(15000, 14.0, "splitwise-conv"), "lumen",
                   FailurePlan((FailureSpec(300.0, workers=(0,)),)), seed=0)
    res.records   # list[lumen.metrics.RequestRecord]; res.stats: counters (restores, shed, ...)
    exp = run_experiment(cfg, WorkloadSpec(15000, 14.0), ["lumen", "stop-restart"], plan, repeats=5)

Model and cost details: `lumen.sim.core` and `lumen.sim.cost` docstrings, docs/simulation.md.
"""

from .config import FailurePlan, FailureSpec, SimConfig, SimStats, parse_duration, parse_fail
from .core import SimResult, Simulator, simulate
from .cost import (
    DEFAULT_DRAFT,
    DEVICES,
    MODELS,
    PROFILE_COLUMNS,
    CostModel,
    DeviceSpec,
    FittedCost,
    ModelShape,
    RooflineCost,
    fit_profile,
    load_profile,
    read_profile,
    write_profile,
)
from .experiment import Experiment, WorkloadSpec, run_experiment

__all__ = [
    "DEFAULT_DRAFT", "DEVICES", "MODELS", "PROFILE_COLUMNS", "CostModel", "DeviceSpec", "Experiment",
    "FailurePlan", "FailureSpec", "FittedCost", "ModelShape", "RooflineCost", "SimConfig", "SimResult",
    "SimStats", "Simulator", "WorkloadSpec", "fit_profile", "load_profile", "parse_duration",
    "parse_fail", "read_profile", "run_experiment", "simulate", "write_profile",
]
