"""Snapshots the policy functions decide on.

A caller (live controller or simulator) builds a `ClusterView` of every worker it knows of and
`RequestView`s of the requests in question, calls a policy function, and applies the result.
The functions read attributes only; they never mutate their inputs.

Duck typing: the functions only read the attributes listed on `WorkerView`/`RequestView`. The
simulator passes its own worker objects (which expose the same attributes) instead of copying
1,024 frozen views per decision; `tests/test_sim_policy.py` snapshots them into real `WorkerView`s
and checks the decisions are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .states import WorkerState

Mode = Literal["restore", "recompute"]


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: int
    state: WorkerState
    epoch: int
    alive: bool                     # process up (a hung worker may be alive but DOWN)
    waiting: int                    # requests queued, not yet scheduled
    running: int                    # requests in the running batch (prefilling or decoding)
    q_wait_s: float                 # estimated queueing delay of a new request here, seconds
    ckpt_reserved_bytes: int        # R_w: host bytes reserved for other workers' checkpoints
    ckpt_budget_bytes: int          # host budget for checkpoints
    h2d_bytes_per_s: float          # B_h2d of this worker (restore bandwidth)
    node: str | int | None = None   # physical host; None = unknown
    partner: int | None = None      # assisted-recovery partner (either side), None if unpaired

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", WorkerState(self.state))
        if self.waiting < 0 or self.running < 0:
            raise ValueError(f"worker {self.id}: negative load")
        if self.ckpt_reserved_bytes < 0 or self.ckpt_budget_bytes < 0:
            raise ValueError(f"worker {self.id}: negative checkpoint bytes")
        if not self.h2d_bytes_per_s > 0:
            raise ValueError(f"worker {self.id}: h2d_bytes_per_s must be > 0")

    @property
    def ckpt_free_bytes(self) -> int:
        return self.ckpt_budget_bytes - self.ckpt_reserved_bytes

    @property
    def serving(self) -> bool:
        """May execute requests and hold checkpoints."""
        return self.alive and self.state is WorkerState.SERVING


@dataclass(frozen=True, slots=True)
class RequestView:
    id: int
    executor: int | None             # e(r): the worker that ran it (the failed one, at dispatch)
    holder: int | None               # h(r), None if unprotected
    reservation_bytes: int           # s_r
    valid_prefix_tokens: int         # longest contiguous valid checkpointed prefix at the holder
    total_tokens: int                # prompt + tokens generated so far (what a recompute prefills)
    # Epoch of the holder when its pages were stored. A holder that died and restarted has a new
    # epoch and an empty store, so a mismatch means "no checkpoint". None = caller did not track it.
    holder_epoch: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.valid_prefix_tokens <= self.total_tokens:
            raise ValueError(f"request {self.id}: valid prefix outside [0, total_tokens]")


@dataclass(frozen=True, slots=True)
class ClusterView:
    workers: Sequence[WorkerView]    # a tuple in practice; any order (functions sort by id)
    lam: float = 1.0                 # lambda of the placement objective

    def __post_init__(self) -> None:
        ids = [w.id for w in self.workers]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate worker ids in ClusterView")

    def worker(self, wid: int) -> WorkerView | None:
        for w in self.workers:
            if w.id == wid:
                return w
        return None


@dataclass(frozen=True, slots=True)
class Assignment:
    request_id: int
    target: int
    mode: Mode          # "restore": load the valid prefix at the target (the holder); "recompute"


class NoServingWorker(LookupError):
    """No alive SERVING worker exists: the caller must hold or fail the requests explicitly."""
