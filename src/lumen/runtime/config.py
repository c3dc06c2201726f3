"""Cluster configuration shared by `lumen serve`, the controller and the launchers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..policy.replicas import FailureModel
from ..policy.slots import share_groups

# --draft-first: whether a worker restarted under speculation reads its draft (not resident in host
# memory) before its target. auto: the controller's pricing (policy.draft_phase_pays, issue 24);
# always: every such restart does (the paper); never: the target's read starts at once
DRAFT_FIRST_CHOICES = ("auto", "always", "never")


@dataclass
class ClusterConfig:
    model: str                              # HF directory, "default", or "preset:NAME"
    served_model_name: str
    num_workers: int = 2
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    policy: str = "stop-restart"
    host: str = "127.0.0.1"
    # failure detection (DESIGN.md section 5): heartbeat every 100 ms; DESIGN's 3 misses (300 ms) declared
    # healthy GPU workers dead in 6 of 7 runs (2x H200, 2026-11-28), hence 10 (1 s) on every device. Only
    # hangs wait for it: a crash or kill is seen at once through the process sentinel
    hb_interval_s: float = 0.1
    hb_misses: int = 10
    fence_grace_s: float = 0.0              # how long a fenced (hung) incarnation may linger before SIGKILL
    restart_backoff_s: float = 0.5
    startup_timeout_s: float = 600.0        # a new incarnation must say HELLO within this
    loading_hb_timeout_s: float = 30.0      # heartbeat budget while a worker loads (it holds no requests)
    loop_stall_s: float = 120.0             # a worker whose engine loop has not turned for this long is dead
    pending_timeout_s: float = 120.0        # interrupted requests wait this long for a reloading worker
    # engine
    block_size: int = 16
    num_blocks: int | None = None
    max_batch: int = 512
    chunk_tokens: int = 256
    deterministic: bool = False
    dtype: str | None = None
    max_model_len: int = 2048
    # checkpointing
    ckpt_budget_bytes: int = 2 << 30
    # at most one page export per this many ms (0: after every engine step); see Worker._stream_pages
    ckpt_export_interval_ms: float = 100.0
    kv_bytes_per_token: int = 0             # filled from the model config
    h2d_bytes_per_s: float = 10e9           # B_h2d used by placement; measured on GPU workers
    lam: float = 1.0
    # checkpoint copies per request (issue 25): an int >= 1, or "auto" (policy.ReplicaRule: at most
    # ckpt_replicas_max, planning for the MTBFs below; None: that kind of failure is not planned for)
    ckpt_replicas: int | str = 1
    ckpt_replicas_max: int = 3
    ckpt_worker_mtbf_s: float | None = 3600.0
    ckpt_domain_mtbf_s: float | None = None
    ckpt_net_bytes_per_s: float = 1.25e9    # auto: a copy's stream is priced at this NIC rate (10 Gbit/s)
    # failure domain label per worker (--domains: e.g. racks); None: the node (Ray), else each its own
    domains: list[str] | None = None
    # assisted recovery
    draft_model: str | None = None
    cold_restart: bool = False             # evict weights from the page cache before a restart
    spec_k: int = 4
    spec_acceptance: float = 0.6           # prior per-token acceptance of the draft pair (goodput rule)
    draft_first: str = "auto"               # one of DRAFT_FIRST_CHOICES (Controller._draft_first)
    # back-pressure
    max_pending: int = 1024
    nodes: list[str] | None = None          # node identity per worker (Ray); None = one node
    # each worker owns a fixed share of its GPU's SMs (CUDA MPS, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE < 100):
    # workers on one GPU then count as on accelerators of their own (a restarting one may draft)
    gpu_share_fixed: bool = False
    # time-division shares (lumen.policy.slots): workers on one device take turns in fixed slots, so a
    # dead worker's share stays idle instead of speeding up the survivors; "shared": each uses it freely
    device_share: str = "shared"
    slot_ms: float = 0.0                    # slot length under "slots" (set by build_config)
    cpu_cores: list[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0)))
    cpu_lanes_max: int = 1                  # --cpu-lanes: 1, the whole CPU to one worker at a time

    def device_for(self, worker_id: int) -> str:
        return self.devices[worker_id % len(self.devices)]

    def share_device(self, worker_id: int) -> str:
        """The device a worker shares with others: its GPU ("cuda" and "cuda:0" are one), or under slots
        on a CPU its lane, a set of cores (`cpu_cores_of`)."""
        d = self.device_for(worker_id)
        if d == "cpu":
            return f"cpu/lane{self._cpu_lane(worker_id)}" if self.device_share == "slots" else "cpu"
        return d if ":" in d else d + ":0"

    def _cpu_lane(self, worker_id: int) -> int:
        # by the worker's place among the CPU workers, so that lanes fill evenly beside GPU workers
        return sum(1 for i in range(worker_id) if self.device_for(i) == "cpu") % self.cpu_lanes()

    def share_groups(self) -> list[tuple[int, int]]:
        """(index, count) of each worker among the workers on its device."""
        return share_groups([self.share_device(i) for i in range(self.num_workers)])

    def cpu_lanes(self) -> int:
        cpu_workers = sum(1 for i in range(self.num_workers) if self.device_for(i) == "cpu")
        return max(1, min(len(self.cpu_cores), cpu_workers, self.cpu_lanes_max))

    def cpu_cores_of(self, worker_id: int) -> list[int]:
        """Under slots, a CPU worker's cores: the box's cores split into `cpu_lanes` equal lanes, the i-th
        CPU worker in lane i mod lanes, each lane time-sliced among its own workers. One lane (the default) isolates:
        4 workers on the 2-core box, one SIGKILLed, the survivors' rate changed -2.4%, at 0.80x the
        cluster rate of free sharing; 2 lanes of one core gave 1.16x that rate, but the survivors sped up
        35% after the kill, through the cores the gateway and the load client then had to themselves and
        the memory bandwidth the lanes share (docs/benchmarks.md, "Time-division shares")."""
        lanes, cores = self.cpu_lanes(), self.cpu_cores
        j = self._cpu_lane(worker_id)
        return cores[j * len(cores) // lanes:(j + 1) * len(cores) // lanes]

    def slot_of(self, worker_id: int) -> tuple[int, int] | None:
        """(index, count) of the worker among those sharing its device under slots; None otherwise."""
        return self.share_groups()[worker_id] if self.device_share == "slots" else None

    def node_of(self, worker_id: int) -> str | None:
        return self.nodes[worker_id] if self.nodes and worker_id < len(self.nodes) else None

    def domain_label(self, worker_id: int) -> str | None:
        return self.domains[worker_id] if self.domains and worker_id < len(self.domains) else None

    def failure_model(self) -> FailureModel:
        return FailureModel.from_mtbf(self.ckpt_worker_mtbf_s, self.ckpt_domain_mtbf_s)


def mps_share_fixed(environ: dict[str, str], workers_per_gpu: int = 1) -> bool:
    """Whether CUDA processes started with this environment get fixed, disjoint shares of their GPU's
    SMs: an MPS active-thread percentage P below 100 with P x workers_per_gpu <= 100. (MPS ignores P
    where no MPS daemon runs; `benchmarks/gpu_repro.sh` sets it only once a daemon has served a client.)"""
    try:
        pct = float(environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100"))
    except ValueError:
        return False
    return 0 < pct < 100 and pct * max(workers_per_gpu, 1) <= 100
