"""Snapshots the policy functions decide on.

A caller builds a `ClusterView` of every worker it knows of and `RequestView`s of the requests in
question, calls a policy function, and applies the result. The functions never mutate inputs.

Internally every decision reads a columnar form of the view (`Columns`: one numpy array per
field, workers sorted by id), so one code path serves 4 workers and 1,024 alike:
- `ClusterView(workers=(WorkerView, ...))` builds its columns once, lazily (the live controller).
- `ClusterTable` is a mutable set of columns that a caller with many decisions per second keeps
  current in place (the simulator: O(1) writes per change instead of rebuilding 1,024 views per
  decision); `table.view(lam)` wraps it as a ClusterView. A view of a table is a snapshot only
  for the duration of one call. `tests/test_sim_policy.py` checks that the simulator's table
  gives the same decisions as frozen `WorkerView` snapshots of the same state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .states import WorkerState

Mode = Literal["restore", "recompute"]

STATE_CODES: dict[WorkerState, int] = {s: i for i, s in enumerate(WorkerState)}
_CODE_STATES = tuple(WorkerState)
SERVING_CODE = STATE_CODES[WorkerState.SERVING]


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
    accelerator: str | None = None  # the GPU it runs on, where workers of one node may share one

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", WorkerState(self.state))
        if self.waiting < 0 or self.running < 0:
            raise ValueError(f"worker {self.id}: negative load")
        if self.ckpt_reserved_bytes < 0 or self.ckpt_budget_bytes < 0:
            raise ValueError(f"worker {self.id}: negative checkpoint bytes")
        if not self.h2d_bytes_per_s > 0:
            raise ValueError(f"worker {self.id}: h2d_bytes_per_s must be > 0")
        if not (self.q_wait_s >= 0 and math.isfinite(self.q_wait_s)):
            raise ValueError(f"worker {self.id}: q_wait_s must be finite and >= 0")

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


class Columns:
    """The view as arrays, index i = the i-th worker by ascending id. `node` holds integer codes
    (-1 = unknown; equal codes = same node). Read-only for policy functions."""

    __slots__ = ("ids", "state", "alive", "waiting", "running", "q", "reserved", "budget", "h2d",
                 "node", "partnered", "epoch", "_index")

    def eligible(self) -> np.ndarray:
        """alive and SERVING: may execute requests and hold checkpoints."""
        return self.alive & (self.state == SERVING_CODE)

    def load(self) -> np.ndarray:
        return self.waiting + self.running

    def idx(self, wid: int | None) -> int | None:
        return None if wid is None else self._index.get(wid)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_workers(cls, workers: Iterable[WorkerView]) -> Columns:
        ws = sorted(workers, key=lambda w: w.id)
        c = cls()
        codes: dict = {}
        c.ids = np.array([w.id for w in ws], dtype=np.int64)
        c.state = np.array([STATE_CODES[WorkerState(w.state)] for w in ws], dtype=np.int8)
        c.alive = np.array([bool(w.alive) for w in ws], dtype=bool)
        c.waiting = np.array([w.waiting for w in ws], dtype=np.int64)
        c.running = np.array([w.running for w in ws], dtype=np.int64)
        c.q = np.array([w.q_wait_s for w in ws], dtype=np.float64)
        c.reserved = np.array([w.ckpt_reserved_bytes for w in ws], dtype=np.int64)
        c.budget = np.array([w.ckpt_budget_bytes for w in ws], dtype=np.int64)
        c.h2d = np.array([w.h2d_bytes_per_s for w in ws], dtype=np.float64)
        c.node = np.array([-1 if w.node is None else codes.setdefault(w.node, len(codes)) for w in ws],
                          dtype=np.int64)
        c.partnered = np.array([w.partner is not None for w in ws], dtype=bool)
        c.epoch = np.array([w.epoch for w in ws], dtype=np.int64)
        c._index = {int(w): i for i, w in enumerate(c.ids)}
        if len(c._index) != len(ws):
            raise ValueError("duplicate worker ids in ClusterView")
        return c


class ClusterTable(Columns):
    """Mutable columns for workers 0..n-1 (index = id), kept current by the caller: numeric
    columns by direct writes (`table.waiting[i] = 3`), state and liveness through `set_state` /
    `set_alive` (they also maintain the cached eligibility mask every decision reads)."""

    __slots__ = ("_elig",)

    def __init__(self, n: int):
        self.ids = np.arange(n, dtype=np.int64)
        self.state = np.full(n, SERVING_CODE, dtype=np.int8)
        self.alive = np.ones(n, dtype=bool)
        self.waiting = np.zeros(n, dtype=np.int64)
        self.running = np.zeros(n, dtype=np.int64)
        self.q = np.zeros(n, dtype=np.float64)
        self.reserved = np.zeros(n, dtype=np.int64)
        self.budget = np.zeros(n, dtype=np.int64)
        self.h2d = np.ones(n, dtype=np.float64)
        self.node = np.full(n, -1, dtype=np.int64)
        self.partnered = np.zeros(n, dtype=bool)
        self.epoch = np.zeros(n, dtype=np.int64)
        self._index = _Identity(n)
        self._elig = np.ones(n, dtype=bool)

    def set_state(self, wid: int, state: WorkerState) -> None:
        code = STATE_CODES[WorkerState(state)]
        self.state[wid] = code
        self._elig[wid] = bool(self.alive[wid]) and code == SERVING_CODE

    def set_alive(self, wid: int, alive: bool) -> None:
        self.alive[wid] = alive
        self._elig[wid] = bool(alive) and int(self.state[wid]) == SERVING_CODE

    def eligible(self) -> np.ndarray:
        return self._elig.copy()    # callers may mask it in place

    def view(self, lam: float = 1.0) -> ClusterView:
        return ClusterView(lam=lam, columns=self)


class _Identity:
    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def get(self, wid: int) -> int | None:
        return wid if 0 <= wid < self.n else None


class ClusterView:
    """`ClusterView(workers, lam=1.0)`: a snapshot of the cluster; workers in any order."""

    __slots__ = ("_workers", "lam", "_cols")

    def __init__(self, workers: Sequence[WorkerView] | None = None, lam: float = 1.0, *,
                 columns: Columns | None = None):
        if (workers is None) == (columns is None):
            raise TypeError("give exactly one of workers or columns")
        self._workers = tuple(workers) if workers is not None else None
        self.lam = float(lam)
        self._cols = columns
        if self._workers is not None:
            ids = [w.id for w in self._workers]
            if len(set(ids)) != len(ids):
                raise ValueError("duplicate worker ids in ClusterView")

    @property
    def columns(self) -> Columns:
        if self._cols is None:
            self._cols = Columns.from_workers(self._workers or ())
        return self._cols

    @property
    def workers(self) -> tuple[WorkerView, ...]:
        if self._workers is None:     # materialise from columns (diagnostics, tests)
            c = self._cols
            assert c is not None
            return tuple(WorkerView(int(c.ids[i]), _CODE_STATES[int(c.state[i])], int(c.epoch[i]),
                                    bool(c.alive[i]), int(c.waiting[i]), int(c.running[i]),
                                    float(c.q[i]), int(c.reserved[i]), int(c.budget[i]),
                                    float(c.h2d[i]), None if c.node[i] < 0 else int(c.node[i]),
                                    -1 if c.partnered[i] else None)
                         for i in range(len(c)))
        return self._workers

    def worker(self, wid: int) -> WorkerView | None:
        for w in self.workers:
            if w.id == wid:
                return w
        return None

    def __repr__(self) -> str:
        return f"ClusterView({len(self.columns)} workers, lam={self.lam})"


@dataclass(frozen=True, slots=True)
class Assignment:
    request_id: int
    target: int
    mode: Mode          # "restore": load the valid prefix at the target (the holder); "recompute"


class NoServingWorker(LookupError):
    """No alive SERVING worker exists: the caller must hold or fail the requests explicitly."""
